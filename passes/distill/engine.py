"""Runs an onnx-ir graph in PyTorch with autograd, so distillation can train its weights.

``TorchGraph(model, trainable)`` turns the chosen float initializers into
``nn.Parameter``s (everything else is a constant buffer), executes the nodes in graph
order, each by a plain function of ``OPS`` (op type -> ``fn(node, inputs) -> outputs``;
ORT contrib ops are keyed ``com.microsoft.<op type>``),
and ``write_back`` stores the trained values into the same initializers: the graph's
structure never changes, so the trained model is the compressed model with new numbers.

An initializer read by several nodes (cross-layer weight sharing) is one Parameter, so
its gradient sums over all its uses and it stays shared when written back.

Shape subgraphs (Shape, Gather, Concat, Range, ...) run on the actual tensors, so any
batch and sequence length works; integer tensors stay integer and float math runs in
the tensor's own dtype (float32, or float16 models; normalizations compute float16 in
float32, as ORT does). Nothing here draws random numbers.

The op set is what our exports and structural passes produce (scanned from the tiny
exports of every arch and exporter, MiniLM and SmolLM2) and their near relatives, plus
the com.microsoft ops ORT's optimizer writes besides fused attention. Fused attention and
quantized ops raise ``OnnxpressError``: distillation runs before those passes.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F  # noqa: N812
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions import erfgelu

from onnxpress.editing import new_tensor
from onnxpress.errors import OnnxpressError

Inputs = Sequence[torch.Tensor | None]
OpFn = Callable[[ir.Node, Inputs], torch.Tensor | Sequence[torch.Tensor]]

_DTYPES = {
    ir.DataType.FLOAT: torch.float32,
    ir.DataType.FLOAT16: torch.float16,
    ir.DataType.DOUBLE: torch.float64,
    ir.DataType.INT64: torch.int64,
    ir.DataType.INT32: torch.int32,
    ir.DataType.INT16: torch.int16,
    ir.DataType.INT8: torch.int8,
    ir.DataType.UINT8: torch.uint8,
    ir.DataType.BOOL: torch.bool,
}


def torch_dtype(dtype: ir.DataType) -> torch.dtype:
    if dtype not in _DTYPES:
        raise OnnxpressError(f"distill: tensors of type {dtype.name} cannot run in PyTorch; supported: "
                             + ", ".join(d.name for d in _DTYPES))
    return _DTYPES[dtype]


def to_torch(tensor: ir.TensorProtocol) -> torch.Tensor:
    torch_dtype(tensor.dtype)  # a clear error for types torch cannot hold
    return torch.from_numpy(np.array(tensor.numpy()))  # a copy: the ir tensor is never aliased


def _ints(t: torch.Tensor) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _opt(x: Inputs, i: int) -> torch.Tensor | None:
    """Optional input ``i``: absent at the end of the list or given as None in the middle."""
    return x[i] if len(x) > i else None


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _unsupported(node: ir.Node, what: str) -> OnnxpressError:
    return OnnxpressError(f"distill: {node.op_type} node {node.name!r} uses {what}, which the PyTorch engine "
                          "does not implement")


# --------------------------------------------------------------------------- op functions


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # ONNX (and ORT) integer division truncates towards zero, like C
    if a.dtype.is_floating_point:
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _constant(node: ir.Node, x: Inputs) -> torch.Tensor:
    a = node.attributes
    if "value" in a:
        return to_torch(a.get_tensor("value"))
    if "value_float" in a:
        return torch.tensor(a.get_float("value_float"), dtype=torch.float32)
    if "value_floats" in a:
        return torch.tensor(list(a.get_floats("value_floats")), dtype=torch.float32)
    if "value_int" in a:
        return torch.tensor(a.get_int("value_int"), dtype=torch.int64)
    if "value_ints" in a:
        return torch.tensor(list(a.get_ints("value_ints")), dtype=torch.int64)
    raise _unsupported(node, f"attribute {next(iter(a), 'none')!r}")


def _constant_of_shape(node: ir.Node, x: Inputs) -> torch.Tensor:
    value = node.attributes.get_tensor("value")
    fill = to_torch(value).reshape(()) if value is not None else torch.tensor(0.0)
    return torch.full(_ints(x[0]), fill.item(), dtype=fill.dtype, device=x[0].device)


def _cast(node: ir.Node, x: Inputs) -> torch.Tensor:
    return x[0].to(torch_dtype(ir.DataType(node.attributes.get_int("to"))))


def _shape(node: ir.Node, x: Inputs) -> torch.Tensor:
    # Python slicing clamps start/end exactly as ONNX Shape does
    dims = list(x[0].shape)[node.attributes.get_int("start", 0) : node.attributes.get_int("end", None)]
    return torch.tensor(dims, dtype=torch.int64, device=x[0].device)


def _reshape(node: ir.Node, x: Inputs) -> torch.Tensor:
    data, shape = x[0], _ints(x[1])
    if not node.attributes.get_int("allowzero", 0):  # 0 copies the input's dim
        shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return data.reshape(shape)


def _flatten(node: ir.Node, x: Inputs) -> torch.Tensor:
    data = x[0]
    axis = _axis(node.attributes.get_int("axis", 1), data.ndim)
    return data.reshape(math.prod(data.shape[:axis]), math.prod(data.shape[axis:]))


def _transpose(node: ir.Node, x: Inputs) -> torch.Tensor:
    perm = node.attributes.get_ints("perm", None)
    return x[0].permute(list(perm) if perm is not None else list(range(x[0].ndim))[::-1])


def _axes(node: ir.Node, x: Inputs) -> list[int] | None:
    """Axes from the second input (newer opsets) or the ``axes`` attribute (older ones)."""
    if _opt(x, 1) is not None:
        return _ints(x[1])
    axes = node.attributes.get_ints("axes", None)
    return list(axes) if axes is not None else None


def _unsqueeze(node: ir.Node, x: Inputs) -> torch.Tensor:
    data, axes = x[0], _axes(node, x) or []
    rank = data.ndim + len(axes)
    for axis in sorted(_axis(a, rank) for a in axes):
        data = data.unsqueeze(axis)
    return data


def _squeeze(node: ir.Node, x: Inputs) -> torch.Tensor:
    axes = _axes(node, x)
    if axes is None:
        return x[0].squeeze()
    return x[0].squeeze(tuple(_axis(a, x[0].ndim) for a in axes))


def _concat(node: ir.Node, x: Inputs) -> torch.Tensor:
    return torch.cat(list(x), dim=node.attributes.get_int("axis"))


def _split(node: ir.Node, x: Inputs) -> tuple[torch.Tensor, ...]:
    data = x[0]
    axis = _axis(node.attributes.get_int("axis", 0), data.ndim)
    dim = data.shape[axis]
    if _opt(x, 1) is not None:
        sizes = _ints(x[1])
    elif "split" in node.attributes:  # opset < 13
        sizes = list(node.attributes.get_ints("split"))
    else:  # num_outputs (opset 18) or one part per output: equal parts, the last one smaller
        parts = node.attributes.get_int("num_outputs", len(node.outputs))
        size = -(-dim // parts)
        sizes = [size] * (parts - 1) + [dim - size * (parts - 1)]
    return torch.split(data, sizes, dim=axis)


def _slice(node: ir.Node, x: Inputs) -> torch.Tensor:
    data = x[0]
    if len(x) > 1:
        starts, ends = _ints(x[1]), _ints(x[2])
        axes = _ints(x[3]) if _opt(x, 3) is not None else list(range(len(starts)))
        steps = _ints(x[4]) if _opt(x, 4) is not None else [1] * len(starts)
    else:  # opset < 10: attributes
        starts, ends = list(node.attributes.get_ints("starts")), list(node.attributes.get_ints("ends"))
        axes = list(node.attributes.get_ints("axes", range(len(starts))))
        steps = [1] * len(starts)
    index: list[slice] = [slice(None)] * data.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = _axis(axis, data.ndim)
        # slice.indices clamps start/end for either sign of step exactly as ONNX Slice does
        lo, hi, st = slice(start, end, step).indices(data.shape[axis])
        if st > 0:
            index[axis] = slice(lo, hi, st)
        else:  # torch has no negative-step slicing
            data = data.index_select(axis, torch.arange(lo, hi, st, device=data.device))
    return data[tuple(index)]


def _gather(node: ir.Node, x: Inputs) -> torch.Tensor:
    data, idx = x
    axis = _axis(node.attributes.get_int("axis", 0), data.ndim)
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    picked = data.index_select(axis, idx.reshape(-1))
    return picked.reshape((*data.shape[:axis], *idx.shape, *data.shape[axis + 1 :]))


def _gather_elements(node: ir.Node, x: Inputs) -> torch.Tensor:
    data, idx = x
    axis = _axis(node.attributes.get_int("axis", 0), data.ndim)
    return torch.gather(data, axis, torch.where(idx < 0, idx + data.shape[axis], idx))


def _gather_nd(node: ir.Node, x: Inputs) -> torch.Tensor:
    data, idx = x
    b, k = node.attributes.get_int("batch_dims", 0), idx.shape[-1]
    dims = torch.tensor(data.shape[b : b + k], device=idx.device)
    idx = torch.where(idx < 0, idx + dims, idx).reshape((-1, *idx.shape[b:]))
    flat = data.reshape((-1, *data.shape[b:]))  # batch dims folded into one
    rows = torch.arange(flat.shape[0], device=idx.device).reshape((-1, *[1] * (idx.ndim - 2)))
    out = flat[(rows, *idx.unbind(-1))]
    return out.reshape((*data.shape[:b], *out.shape[1:]))


def _scatter_nd(node: ir.Node, x: Inputs) -> torch.Tensor:
    data, idx, updates = x
    if node.attributes.get_string("reduction", "none") != "none":
        raise _unsupported(node, f"reduction={node.attributes.get_string('reduction')!r}")
    dims = torch.tensor(data.shape[: idx.shape[-1]], device=idx.device)
    idx = torch.where(idx < 0, idx + dims, idx)
    return data.index_put(tuple(idx.unbind(-1)), updates)  # out of place: autograd sees it


def _expand(node: ir.Node, x: Inputs) -> torch.Tensor:
    # ONNX Expand broadcasts both ways: a 1 in the shape keeps the input's dim
    return x[0].expand(torch.broadcast_shapes(x[0].shape, tuple(_ints(x[1]))))


def _range(node: ir.Node, x: Inputs) -> torch.Tensor:
    start, limit, delta = (t.item() for t in x)
    count = max(math.ceil((limit - start) / delta), 0)
    steps = torch.arange(count, dtype=x[0].dtype, device=x[0].device)
    return x[0] + steps * x[2]  # start + i * delta, the spec's formula


def _where(node: ir.Node, x: Inputs) -> torch.Tensor:
    return torch.where(x[0], x[1], x[2])


def _trilu(node: ir.Node, x: Inputs) -> torch.Tensor:
    k = _ints(x[1])[0] if _opt(x, 1) is not None else 0
    return torch.triu(x[0], k) if node.attributes.get_int("upper", 1) else torch.tril(x[0], k)


def _cumsum(node: ir.Node, x: Inputs) -> torch.Tensor:
    data, axis = x[0], _axis(_ints(x[1])[0], x[0].ndim)
    reverse = node.attributes.get_int("reverse", 0)
    if reverse:
        data = data.flip(axis)
    out = data.cumsum(axis).to(data.dtype)
    if node.attributes.get_int("exclusive", 0):  # shift by one, a zero first
        shifted = out.narrow(axis, 0, out.shape[axis] - 1)
        out = torch.cat([torch.zeros_like(out.narrow(axis, 0, 1)), shifted], axis)
    return out.flip(axis) if reverse else out


def _clip(node: ir.Node, x: Inputs) -> torch.Tensor:
    if len(x) > 1:
        return torch.clamp(x[0], _opt(x, 1), _opt(x, 2))
    return torch.clamp(x[0], node.attributes.get_float("min", None), node.attributes.get_float("max", None))


def _softmax(log: bool) -> OpFn:
    def run(node: ir.Node, x: Inputs) -> torch.Tensor:
        fn = torch.log_softmax if log else torch.softmax
        data = x[0]
        if _opset(node) >= 13:
            return fn(data, node.attributes.get_int("axis", -1))
        # opset < 13: softmax over everything from ``axis`` on, as one flattened row
        axis = _axis(node.attributes.get_int("axis", 1), data.ndim)
        return fn(data.reshape(math.prod(data.shape[:axis]), -1), -1).reshape(data.shape)

    return run


def _opset(node: ir.Node) -> int:
    if node.version is not None:
        return node.version
    imports = node.graph.opset_imports if node.graph is not None else {}
    return imports.get("", imports.get("ai.onnx", 1))


def _reduce(fn: Callable[[torch.Tensor, tuple[int, ...], bool], torch.Tensor]) -> OpFn:
    def run(node: ir.Node, x: Inputs) -> torch.Tensor:
        data, axes = x[0], _axes(node, x)
        if not axes:
            if node.attributes.get_int("noop_with_empty_axes", 0):
                return data
            axes = list(range(data.ndim))
        keep = bool(node.attributes.get_int("keepdims", 1))
        return fn(data, tuple(_axis(a, data.ndim) for a in axes), keep)

    return run


def _reduce_prod(data: torch.Tensor, dims: tuple[int, ...], keep: bool) -> torch.Tensor:
    for d in sorted(dims, reverse=True):
        data = data.prod(d, keepdim=keep)
    return data


def _arg(fn: Callable[..., torch.Tensor]) -> OpFn:
    def run(node: ir.Node, x: Inputs) -> torch.Tensor:
        data = x[0]
        axis = _axis(node.attributes.get_int("axis", 0), data.ndim)
        keep = bool(node.attributes.get_int("keepdims", 1))
        if node.attributes.get_int("select_last_index", 0):
            return data.shape[axis] - 1 - fn(data.flip(axis), dim=axis, keepdim=keep)
        return fn(data, dim=axis, keepdim=keep)  # torch picks the first of equal values, as ONNX does

    return run


def _matmul(node: ir.Node, x: Inputs) -> torch.Tensor:
    return torch.matmul(x[0], x[1])


def _gemm(node: ir.Node, x: Inputs) -> torch.Tensor:
    a, b, c = x[0], x[1], _opt(x, 2)
    attrs = node.attributes
    a = a.transpose(0, 1) if attrs.get_int("transA", 0) else a
    b = b.transpose(0, 1) if attrs.get_int("transB", 0) else b
    alpha, beta = attrs.get_float("alpha", 1.0), attrs.get_float("beta", 1.0)
    out = a @ b if alpha == 1.0 else alpha * (a @ b)
    if c is None:
        return out
    return out + (c if beta == 1.0 else beta * c)


def _fused_matmul(node: ir.Node, x: Inputs) -> torch.Tensor:
    attrs = node.attributes
    if attrs.get_int("transBatchA", 0) or attrs.get_int("transBatchB", 0):
        raise _unsupported(node, "transBatchA/transBatchB")
    a = x[0].transpose(-1, -2) if attrs.get_int("transA", 0) else x[0]
    b = x[1].transpose(-1, -2) if attrs.get_int("transB", 0) else x[1]
    alpha = attrs.get_float("alpha", 1.0)
    return torch.matmul(a, b) if alpha == 1.0 else alpha * torch.matmul(a, b)


def _conv(node: ir.Node, x: Inputs) -> torch.Tensor:
    data, weight, bias = x[0], x[1], _opt(x, 2)
    attrs, n = node.attributes, x[1].ndim - 2
    auto_pad = attrs.get_string("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        raise _unsupported(node, f"auto_pad={auto_pad}")
    pads = [0] * (2 * n) if auto_pad == "VALID" else list(attrs.get_ints("pads", [0] * (2 * n)))
    begin, end = pads[:n], pads[n:]
    if begin != end:  # torch pads symmetrically only: pad explicitly first (F.pad lists the last dim first)
        data = F.pad(data, [p for b, e in reversed(list(zip(begin, end, strict=True))) for p in (b, e)])
        begin = [0] * n
    conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    return conv(data, weight, bias, stride=list(attrs.get_ints("strides", [1] * n)), padding=begin,
                dilation=list(attrs.get_ints("dilations", [1] * n)), groups=attrs.get_int("group", 1))


def _normalize(data: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, axis: int, eps: float,
               *, rms: bool, stash: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Layer / RMS normalization over the dims from ``axis`` on; returns (y, mean, 1/std). With
    ``stash`` (stash_type=1, the default) half precision is computed in float32, as ORT does."""
    dims = tuple(range(_axis(axis, data.ndim), data.ndim))
    xs = data.float() if stash and data.dtype in (torch.float16, torch.bfloat16) else data
    mean = None if rms else xs.mean(dims, keepdim=True)
    centered = xs if rms else xs - mean
    inv_std = torch.rsqrt(centered.pow(2).mean(dims, keepdim=True) + eps)
    y = centered * inv_std * scale.to(xs.dtype)
    if bias is not None:
        y = y + bias.to(xs.dtype)
    return y.to(data.dtype), mean, inv_std


def _layer_norm(rms: bool) -> OpFn:
    def run(node: ir.Node, x: Inputs) -> tuple[torch.Tensor | None, ...]:
        attrs = node.attributes
        axis, eps, bias = attrs.get_int("axis", -1), attrs.get_float("epsilon", 1e-5), None if rms else _opt(x, 2)
        stash = attrs.get_int("stash_type", 1) == 1
        if not any(_read(v) for v in node.outputs[1:]):
            fast = _fused_normalize(x[0], x[1], bias, axis, eps, rms=rms, stash=stash)
            if fast is not None:
                return (fast, None) if rms else (fast, None, None)
        y, mean, inv_std = _normalize(x[0], x[1], bias, axis, eps, rms=rms, stash=stash)
        return (y, inv_std) if rms else (y, mean, inv_std)  # SimplifiedLayerNormalization: (Y, inv_std_var)

    return run


def _read(value: ir.Value | None) -> bool:
    return value is not None and (bool(value.uses()) or value.is_graph_output())


def _fused_normalize(data: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, axis: int, eps: float,
                     *, rms: bool, stash: bool) -> torch.Tensor | None:
    """``_normalize``'s y by torch's fused kernels, when the scale and bias cover the normalized
    dims exactly (None otherwise): one op forward and one backward, where the composition is a
    dozen (MiniLM, a batch of 16 sentences forward and backward, bfloat16 products: 113 -> 101 ms)."""
    shape = tuple(data.shape[_axis(axis, data.ndim):])
    if tuple(scale.shape) != shape or (bias is not None and tuple(bias.shape) != shape):
        return None
    xs = data.float() if stash and data.dtype in (torch.float16, torch.bfloat16) else data
    scale, bias = scale.to(xs.dtype), None if bias is None else bias.to(xs.dtype)
    y = F.rms_norm(xs, shape, scale, eps) if rms else F.layer_norm(xs, shape, scale, bias, eps)
    return y.to(data.dtype)


def _skip_layer_norm(rms: bool) -> OpFn:
    """com.microsoft Skip(Simplified)LayerNormalization: normalize input + skip (+ bias); outputs
    (output, mean, inv_std_var, input_skip_bias_sum)."""

    def run(node: ir.Node, x: Inputs) -> tuple[torch.Tensor | None, ...]:
        beta, bias = (None, _opt(x, 3)) if rms else (_opt(x, 3), _opt(x, 4))
        total = x[0] + x[1] if bias is None else x[0] + x[1] + bias
        eps = node.attributes.get_float("epsilon", 1e-5)
        y, mean, inv_std = _normalize(total, x[2], beta, -1, eps, rms=rms)
        return y, mean, inv_std, total

    return run


def _gelu(node: ir.Node, x: Inputs) -> torch.Tensor:
    return F.gelu(x[0], approximate=node.attributes.get_string("approximate", "none"))


def _bias_gelu(approximate: str) -> OpFn:
    """com.microsoft BiasGelu (erf) and FastGelu (tanh), bias optional."""

    def run(node: ir.Node, x: Inputs) -> torch.Tensor:
        data = x[0] if _opt(x, 1) is None else x[0] + x[1]
        return F.gelu(data, approximate=approximate)

    return run


def _quick_gelu(node: ir.Node, x: Inputs) -> torch.Tensor:
    return x[0] * torch.sigmoid(node.attributes.get_float("alpha", 1.702) * x[0])


def _dropout(node: ir.Node, x: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    return x[0], torch.ones_like(x[0], dtype=torch.bool)  # inference: identity, mask all kept


def _mod(node: ir.Node, x: Inputs) -> torch.Tensor:
    # fmod=0 (integers): the result takes the divisor's sign, as Python's %
    return (torch.fmod if node.attributes.get_int("fmod", 0) else torch.remainder)(x[0], x[1])


def _pow(node: ir.Node, x: Inputs) -> torch.Tensor:
    return torch.pow(x[0], x[1]).to(x[0].dtype)  # the result has the base's type


def _is_inf(node: ir.Node, x: Inputs) -> torch.Tensor:
    attrs = node.attributes
    found = torch.zeros_like(x[0], dtype=torch.bool)
    if attrs.get_int("detect_positive", 1):
        found = found | torch.isposinf(x[0])
    if attrs.get_int("detect_negative", 1):
        found = found | torch.isneginf(x[0])
    return found


def _variadic(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> OpFn:
    return lambda node, x: functools.reduce(fn, x)


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> OpFn:
    return lambda node, x: fn(x[0])


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> OpFn:
    return lambda node, x: fn(x[0], x[1])


OPS: dict[str, OpFn] = {
    # arithmetic (numpy broadcasting, as torch)
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(_div),
    "Pow": _pow,
    "Mod": _mod,
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add),
    "Mean": lambda node, x: functools.reduce(torch.add, x) / len(x),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Sign": _unary(torch.sign),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "Round": _unary(torch.round),  # both round half to even
    "Sqrt": _unary(torch.sqrt),
    "Reciprocal": _unary(torch.reciprocal),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Erf": _unary(torch.erf),
    "Cos": _unary(torch.cos),
    "Sin": _unary(torch.sin),
    "Clip": _clip,
    # activations
    "Tanh": _unary(torch.tanh),
    "Sigmoid": _unary(torch.sigmoid),
    "Relu": _unary(torch.relu),
    "LeakyRelu": lambda node, x: F.leaky_relu(x[0], node.attributes.get_float("alpha", 0.01)),
    "Softplus": _unary(F.softplus),
    "HardSigmoid": lambda node, x: torch.clamp(
        node.attributes.get_float("alpha", 0.2) * x[0] + node.attributes.get_float("beta", 0.5), 0, 1),
    "Gelu": _gelu,
    "Softmax": _softmax(log=False),
    "LogSoftmax": _softmax(log=True),
    # comparisons and logic
    "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt),
    "LessOrEqual": _binary(torch.le),
    "Greater": _binary(torch.gt),
    "GreaterOrEqual": _binary(torch.ge),
    "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or),
    "Xor": _binary(torch.logical_xor),
    "Not": _unary(torch.logical_not),
    "IsNaN": _unary(torch.isnan),
    "IsInf": _is_inf,
    "Where": _where,
    # reductions
    "ReduceMean": _reduce(lambda t, d, k: t.mean(d, keepdim=k)),
    "ReduceSum": _reduce(lambda t, d, k: t.sum(d, keepdim=k)),
    "ReduceMax": _reduce(lambda t, d, k: t.amax(d, keepdim=k)),
    "ReduceMin": _reduce(lambda t, d, k: t.amin(d, keepdim=k)),
    "ReduceProd": _reduce(_reduce_prod),
    "ReduceSumSquare": _reduce(lambda t, d, k: (t * t).sum(d, keepdim=k)),
    "ReduceL2": _reduce(lambda t, d, k: (t * t).sum(d, keepdim=k).sqrt()),
    "ReduceLogSumExp": _reduce(lambda t, d, k: t.logsumexp(d, keepdim=k)),
    "ArgMax": _arg(torch.argmax),
    "ArgMin": _arg(torch.argmin),
    "CumSum": _cumsum,
    # linear algebra and normalization
    "MatMul": _matmul,
    "Gemm": _gemm,
    "Einsum": lambda node, x: torch.einsum(node.attributes.get_string("equation"), *x),
    "Conv": _conv,
    "LayerNormalization": _layer_norm(rms=False),
    "SimplifiedLayerNormalization": _layer_norm(rms=True),  # ORT registers it in the ONNX domain
    "RMSNormalization": _layer_norm(rms=True),
    # shapes, indexing and data movement
    "Shape": _shape,
    "Size": lambda node, x: torch.tensor(x[0].numel(), dtype=torch.int64, device=x[0].device),
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Transpose": _transpose,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "GatherElements": _gather_elements,
    "GatherND": _gather_nd,
    "ScatterND": _scatter_nd,
    "Expand": _expand,
    "Tile": lambda node, x: x[0].repeat(_ints(x[1])),
    "Range": _range,
    "Trilu": _trilu,
    "Cast": _cast,
    "CastLike": lambda node, x: x[0].to(x[1].dtype),
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "Identity": _unary(lambda t: t),
    "Dropout": _dropout,
    # ORT contrib ops: what ORT's transformer optimizer writes besides fused attention
    "com.microsoft.FusedMatMul": _fused_matmul,
    "com.microsoft.Gelu": _gelu,
    "com.microsoft.BiasGelu": _bias_gelu("none"),
    "com.microsoft.FastGelu": _bias_gelu("tanh"),
    "com.microsoft.QuickGelu": _quick_gelu,
    "com.microsoft.SkipLayerNormalization": _skip_layer_norm(rms=False),
    "com.microsoft.SkipSimplifiedLayerNormalization": _skip_layer_norm(rms=True),
}


# --------------------------------------------------------------------------- the module


def op_key(node: ir.Node) -> str:
    """The key of ``node``'s function in OPS: the op type, prefixed by the domain outside ai.onnx."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def check_supported(graph: ir.Graph) -> None:
    """Raise one OnnxpressError naming every op type of ``graph`` the engine cannot run."""
    missing = sorted({
        f"{node.op_type} ({node.domain})" if node.domain not in ("", "ai.onnx") else node.op_type
        for node in graph
        if op_key(node) not in OPS
    })
    if missing:
        raise OnnxpressError(
            f"distill: the PyTorch engine cannot run {', '.join(missing)}; distillation must run before "
            "attention fusion and quantization, which write fused and quantized ops"
        )


def float32_copy(model: ir.Model) -> ir.Model:
    """A half-precision model as float32 (the model itself when it has no float16 tensors):
    initializers, constants, Casts and typed inputs. Training runs on this copy: CPU matmuls
    in float16 are slow, and Adam's small updates vanish in float16 weights; ``write_back``
    rounds the trained values to the model's own type."""
    half = ir.DataType.FLOAT16
    graph = model.graph
    if not any(v.const_value is not None and v.const_value.dtype == half for v in graph.initializers.values()) \
            and not any(v.dtype == half for v in graph.inputs):
        return model
    copy = model.clone()
    for value in copy.graph.initializers.values():
        if value.const_value is not None and value.const_value.dtype == half:
            value.const_value = ir.tensor(value.const_value.numpy().astype(np.float32), name=value.name)
    for node in ir.traversal.RecursiveGraphIterator(copy.graph):
        for key in ("value", "to"):
            attr = node.attributes.get(key)
            if attr is None:
                continue
            if attr.type == ir.AttributeType.TENSOR and attr.value.dtype == half:
                node.attributes[key] = ir.AttrTensor(key, ir.tensor(attr.value.numpy().astype(np.float32)))
            elif key == "to" and attr.type == ir.AttributeType.INT and attr.value == half:
                node.attributes[key] = ir.AttrInt64(key, ir.DataType.FLOAT)
        for value in node.outputs:
            _to_float32_type(value)
    for value in copy.graph.inputs:
        _to_float32_type(value)
    return copy


# 0.5 * x * (1 + Erf(x / sqrt 2)), as exports write GELU, in any operand order -> com.microsoft.Gelu
_ERF_GELU = pattern.RewriteRuleSet([erfgelu.rule1, erfgelu.rule2], commute=True)


def training_copy(model: ir.Model) -> ir.Model:
    """The graph a student trains as: ``float32_copy``, with GELUs written as the erf formula
    fused into one op (F.gelu: one kernel forward and one backward, where the five ops' backward
    is about a dozen; MiniLM, a batch of 16 sentences forward and backward: 101 -> 85 ms). The
    same function of the same initializers; ``model`` is not changed."""
    copy = float32_copy(model)
    copy = model.clone() if copy is model else copy
    _ERF_GELU.apply_to_model(copy)
    return copy


def _to_float32_type(value: ir.Value) -> None:
    # a new type object: a clone shares its source's, and setting ``dtype`` would change both
    if value.dtype == ir.DataType.FLOAT16:
        value.type = ir.TensorType(ir.DataType.FLOAT)


def _as_predicate(trainable, graph: ir.Graph) -> Callable[[ir.Value], bool]:
    if trainable is None:
        return lambda value: False
    if callable(trainable):
        return trainable
    names = set(trainable)
    unknown = sorted(n for n in names if n not in graph.initializers
                     or not graph.initializers[n].const_value.dtype.is_floating_point())
    if unknown:
        raise OnnxpressError(f"distill: {unknown[0]!r} is not a float initializer of the model, "
                             "so it cannot be trained")
    return lambda value: value.name in names


class TorchGraph(torch.nn.Module):
    """An onnx-ir graph as a torch module: ``forward(feeds)`` -> {output name: tensor}.

    ``trainable`` picks the float initializers that become ``nn.Parameter``s: a predicate on
    the initializer's ``ir.Value`` or a collection of initializer names (None: none, e.g.
    to run a teacher). The module keeps references to ``model``'s values; the model itself is
    only read, until ``write_back``.
    """

    def __init__(self, model: ir.Model, trainable: Callable[[ir.Value], bool] | Iterable[str] | None = None):
        super().__init__()
        graph = model.graph
        check_supported(graph)
        pick = _as_predicate(trainable, graph)
        self.params = torch.nn.ParameterList()
        self._params: dict[ir.Value, int] = {}  # trainable initializer -> index in self.params
        self._buffers_of: dict[ir.Value, str] = {}  # constant value -> name of the buffer holding it
        for value in graph.initializers.values():
            tensor = to_torch(value.const_value)
            if tensor.dtype.is_floating_point and pick(value):
                self._params[value] = len(self.params)
                self.params.append(torch.nn.Parameter(tensor))
            else:
                self._add_constant(value, tensor)
        self._inputs = [v for v in graph.inputs if v not in self._params and v not in self._buffers_of]
        self._outputs = list(graph.outputs)
        self._values = {v.name: v for v in (*graph.inputs, *graph.initializers.values())}
        nodes = []
        for node in graph:
            self._values.update((v.name, v) for v in node.outputs if v.name)
            if op_key(node) == "Constant":
                self._add_constant(node.outputs[0], _constant(node, []))  # read once, not every forward
            else:
                nodes.append(node)
        self._check_order(nodes)
        # after the last node that reads a value, forward drops it (autograd keeps what it needs)
        constants = {*self._params, *self._buffers_of}
        last_use: dict[ir.Value, int] = {}
        for i, node in enumerate(nodes):
            last_use.update((v, i) for v in node.inputs if v is not None and v not in constants)
        release: list[list[ir.Value]] = [[] for _ in nodes]
        for value, i in last_use.items():
            release[i].append(value)
        self._steps = [(node, OPS[op_key(node)], drop) for node, drop in zip(nodes, release, strict=True)]

    def _add_constant(self, value: ir.Value, tensor: torch.Tensor) -> None:
        name = f"const_{len(self._buffers_of)}"
        self.register_buffer(name, tensor, persistent=False)  # moves with .to(device)
        self._buffers_of[value] = name

    def _check_order(self, nodes: list[ir.Node]) -> None:
        known = {*self._params, *self._buffers_of, *self._inputs}
        for node in nodes:
            late = [v.name for v in node.inputs if v is not None and v not in known]
            if late:
                raise OnnxpressError(f"distill: node {node.name!r} reads {late[0]!r} before it is computed "
                                     "(the graph is not topologically sorted)")
            known.update(node.outputs)

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """{initializer name: its Parameter}, one per initializer however many nodes read it."""
        return {value.name: self.params[i] for value, i in self._params.items()}

    def forward(self, feeds: Mapping[str, torch.Tensor | np.ndarray],
                outputs: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Run the graph on ``feeds`` (graph input name -> tensor or array); returns the graph
        outputs, or the named values ``outputs`` (any intermediate value, e.g. hidden states)."""
        wanted = [self._value(n) for n in outputs] if outputs is not None else self._outputs
        device = next(itertools.chain(self.buffers(), self.parameters()), torch.empty(0)).device
        env: dict[ir.Value, torch.Tensor] = {v: self.params[i] for v, i in self._params.items()}
        env.update((v, self.get_buffer(name)) for v, name in self._buffers_of.items())
        for value in self._inputs:
            if value.name not in feeds:
                raise OnnxpressError(f"distill: no feed for graph input {value.name!r}")
            env[value] = torch.as_tensor(feeds[value.name], device=device)
        keep = set(wanted)
        for node, fn, release in self._steps:
            results = fn(node, [None if v is None else env[v] for v in node.inputs])
            if isinstance(results, torch.Tensor):
                results = (results,)
            if len(results) < len(node.outputs):
                raise _unsupported(node, f"{len(node.outputs)} outputs")
            # ops return every output they define; a node may declare only the leading ones
            env.update(zip(node.outputs, results, strict=False))
            for value in release:
                if value not in keep:
                    del env[value]
        return {v.name: env[v] for v in wanted}

    def _value(self, name: str) -> ir.Value:
        if name not in self._values:
            raise OnnxpressError(f"distill: the graph has no value named {name!r}")
        return self._values[name]

    @torch.no_grad()
    def write_back(self, model: ir.Model) -> int:
        """Store the trainable Parameters into ``model``'s initializers of the same names, in
        their original dtype; returns how many tensors were written. Nothing else changes."""
        initializers = model.graph.initializers
        for name, param in self.trainable_parameters().items():
            if name not in initializers:
                raise OnnxpressError(f"distill: the model has no initializer {name!r} to write back to")
            value = initializers[name]
            dtype = torch_dtype(value.const_value.dtype)
            value.const_value = new_tensor(param.detach().to("cpu", dtype).numpy(), name)
        return len(self._params)
