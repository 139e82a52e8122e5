"""Graph helpers shared by the transformer analysis and by the passes.

Exporters differ in *how* they spell the same computation (a weight may be an
initializer, a ``Constant`` node or an ``Identity`` of a shared initializer; a head
split may be ``Reshape`` + ``Transpose`` or ``Split``; a scale may be ``Mul`` or
``Div``). The helpers here let analysis code match on dataflow and ignore the
spelling:

* constant lookup, two readers: :func:`stored_array` reads the data an initializer or
  ``Constant`` node holds (what an edit replaces); :func:`const_array` also folds small
  constant shape arithmetic (``Identity``, ``Cast``, ``Concat``, ``Mul``...: the value a node
  sees). :func:`is_constant` says whether a value depends on no graph input;
* weight lookup: :func:`find_weight` finds the stored initializer behind a MatMul
  operand (through ``Identity`` / ``Cast`` / ``Transpose`` / ``DequantizeLinear``);
* walks: :func:`walk_up` / :func:`walk_down` follow dataflow through caller-chosen
  "transparent" ops and stop where the caller says.

Everything here is read-only: no helper mutates the graph.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

# Ops that only move or reinterpret data: a value passing through them is "the same
# tensor" for matching purposes (heads split/merged, dtype changed, dims added).
LAYOUT_OPS = frozenset(
    {"Reshape", "Transpose", "Cast", "Squeeze", "Unsqueeze", "Identity", "Flatten", "CastLike", "Dropout"}
)
# Ops that repeat KV heads for grouped-query attention, or assemble rotary halves.
REPEAT_OPS = frozenset({"Expand", "Tile", "Concat"})
# Index/slice ops used to unpack packed projections (QKV, gate_up) and rotary halves.
SLICE_OPS = frozenset({"Split", "Slice", "Gather", "Chunk"})
# Elementwise arithmetic: scaling, rotary (q*cos + rotate_half(q)*sin), masking.
ELEMENTWISE_OPS = frozenset({"Mul", "Div", "Add", "Sub", "Neg", "Where"})
# Activation functions as they appear decomposed or fused; used to classify FFNs.
ACTIVATION_OPS = frozenset(
    {
        "Erf",
        "Tanh",
        "Sigmoid",
        "Relu",
        "Gelu",
        "FastGelu",
        "BiasGelu",
        "QuickGelu",
        "Softplus",
        "LeakyRelu",
        "Elu",
        "Selu",
        "HardSigmoid",
        "HardSwish",
        "Mish",
        "Celu",
        "Swish",
        "BiasFastGelu",
    }
)
# Ops that define a normalisation (fused or the anchor of a decomposed one).
FUSED_NORM_OPS = frozenset(
    {
        "LayerNormalization",
        "SimplifiedLayerNormalization",
        "SkipLayerNormalization",
        "SkipSimplifiedLayerNormalization",
        "RMSNormalization",
        "EmbedLayerNormalization",
    }
)
LINEAR_OPS = frozenset({"MatMul", "Gemm", "MatMulNBits", "MatMulInteger", "QLinearMatMul", "FusedMatMul"})

FLOAT_TYPES = frozenset(
    {
        ir.DataType.FLOAT,
        ir.DataType.FLOAT16,
        ir.DataType.BFLOAT16,
        ir.DataType.DOUBLE,
        ir.DataType.FLOAT8E4M3FN,
        ir.DataType.FLOAT8E4M3FNUZ,
        ir.DataType.FLOAT8E5M2,
        ir.DataType.FLOAT8E5M2FNUZ,
    }
)


def is_float_type(dtype: ir.DataType | None) -> bool:
    return dtype in FLOAT_TYPES


# --------------------------------------------------------------------------- walks


def producer(value: ir.Value | None) -> ir.Node | None:
    """The node that computes ``value`` (None for graph inputs and initializers)."""
    return None if value is None else value.producer()


@dataclass
class UpWalk:
    """What :func:`walk_to_linears` found."""

    linears: list = field(default_factory=list)  # the analysis' Linear records reached, in walk order
    graph_inputs: list[ir.Value] = field(default_factory=list)
    nodes: list[ir.Node] = field(default_factory=list)  # crossed nodes, nearest first
    foreign: bool = False  # met a node ``follow`` refused to cross


def walk_to_linears(
    start: ir.Value | None,
    linear_for: Callable[[ir.Value], object | None],
    follow: Callable[[ir.Node], list[ir.Value] | None],
    limit: int,
) -> UpWalk:
    """Breadth-first from ``start`` towards producers, stopping at values a linear layer
    computes (``linear_for(value)`` is not None), at graph inputs and at constants.
    ``follow(node)`` names the inputs to go on through, or None for a node the walk may not
    cross; at most ``limit`` nodes are visited."""
    walk = UpWalk()
    queue = deque([start])
    seen: set[int] = set()
    while queue and len(seen) < limit:
        value = queue.popleft()
        if value is None:
            continue
        if value.is_graph_input():
            if value not in walk.graph_inputs:
                walk.graph_inputs.append(value)
            continue
        lin = linear_for(value)
        if lin is not None:
            if lin not in walk.linears:
                walk.linears.append(lin)
            continue
        node = producer(value)
        if node is None or id(node) in seen or is_constant(value):
            continue
        seen.add(id(node))
        inputs = follow(node)
        if inputs is None:
            walk.foreign = True
            continue
        walk.nodes.append(node)
        queue.extend(inputs)
    return walk


def consumers(value: ir.Value | None) -> list[ir.Node]:
    """Nodes that read ``value``, each once, in use order."""
    if value is None:
        return []
    seen: dict[int, ir.Node] = {}
    for use in value.uses():
        seen.setdefault(id(use.node), use.node)
    return list(seen.values())


def data_consumers(value: ir.Value | None) -> list[ir.Node]:
    """Consumers that read the *data* of ``value`` (not just its shape)."""
    return [n for n in consumers(value) if n.op_type != "Shape"]


def split_if(graph: ir.Graph) -> ir.Node | None:
    """The ``If`` of ``graph`` that runs one of two copies of the same nodes, picked by the size of
    an input (quantize's ``prefill_path``: prompts and decode steps on different kernels), if any."""
    ifs = [node for node in graph if node.op_type == "If"]
    if len(ifs) != 1:
        return None
    condition = producer(ifs[0].inputs[0])
    by_size = condition is not None and condition.op_type == "Greater" and (
        (size := producer(condition.inputs[0])) is not None and size.op_type == "Size")
    then, other = (ifs[0].attributes[b].as_graph() for b in ("then_branch", "else_branch"))
    return ifs[0] if by_size and [n.op_type for n in then] == [n.op_type for n in other] else None


def decode_body(model: ir.Model) -> ir.Model:
    """``model``, or where its graph has a ``split_if``, a copy (weights shared) with the else
    branch's nodes in the If's place: one plain graph, the one decode steps run, for the analysis."""
    if split_if(model.graph) is None:
        return model
    copy = model.clone()
    graph = copy.graph
    branch_if = split_if(graph)
    body = branch_if.attributes["else_branch"].as_graph()
    nodes, results = list(body), list(body.outputs)
    body.outputs.clear()
    body.remove(nodes, safe=False)
    graph.insert_before(branch_if, nodes)
    for inner, outer in zip(results, branch_if.outputs, strict=True):
        outer.replace_all_uses_with(inner, replace_graph_outputs=True)
        inner.name = outer.name
    graph.remove(branch_if, safe=False)
    return copy


def graph_nodes(model_or_graph: ir.Model | ir.Graph) -> list[ir.Node]:
    graph = model_or_graph.graph if isinstance(model_or_graph, ir.Model) else model_or_graph
    return list(graph)


def walk_up(
    start: ir.Value | Iterable[ir.Value],
    through: Callable[[ir.Node], Iterable[ir.Value | None] | None],
    *,
    limit: int = 10_000,
) -> Iterator[tuple[ir.Node, ir.Value]]:
    """Breadth-first walk from ``start`` towards the graph inputs.

    For every producer node reached, yields ``(node, value)`` (the value it
    produced on the walk) and asks ``through(node)`` which of its inputs to follow
    (``None`` or empty: stop here). Each node is visited once.
    """
    queue = deque([start] if isinstance(start, ir.Value) else list(start))
    seen: set[int] = set()
    steps = 0
    while queue and steps < limit:
        value = queue.popleft()
        node = producer(value)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        steps += 1
        yield node, value
        nxt = through(node)
        if nxt:
            queue.extend(v for v in nxt if v is not None)


def float_type(value: ir.Value, limit: int = 200) -> ir.DataType | None:
    """``value``'s float type; where an export leaves it untyped, the type of the nearest Cast or
    typed float operand (an initializer, a graph input) above it. None when none is found."""
    if is_float_type(value.dtype):
        return value.dtype
    for node, _ in walk_up(value, lambda n: n.inputs, limit=limit):
        if node.op_type == "Cast":
            return ir.DataType(node.attributes.get_int("to"))
        for v in node.inputs:
            if v is not None and is_float_type(v.dtype):
                return v.dtype
    return None


def walk_down(
    start: ir.Value | Iterable[ir.Value],
    through: Callable[[ir.Node], bool],
    *,
    limit: int = 10_000,
) -> Iterator[ir.Node]:
    """Breadth-first walk from ``start`` towards the graph outputs.

    Yields every consumer reached; continues through its outputs when
    ``through(node)`` is true. Each node is visited once.
    """
    queue = deque([start] if isinstance(start, ir.Value) else list(start))
    seen: set[int] = set()
    steps = 0
    while queue and steps < limit:
        value = queue.popleft()
        for node in consumers(value):
            if id(node) in seen:
                continue
            seen.add(id(node))
            steps += 1
            yield node
            if through(node):
                queue.extend(node.outputs)


def ancestors(
    values: Iterable[ir.Value], stop: Callable[[ir.Node], bool] | None = None, limit: int = 100_000
) -> set[ir.Node]:
    """All nodes upstream of ``values`` (stopping before nodes where ``stop`` is true)."""
    out: list[ir.Node] = []

    def through(node: ir.Node):
        if stop is not None and stop(node):
            return None
        out.append(node)
        return node.inputs

    for _ in walk_up(list(values), through, limit=limit):
        pass
    return set(out)


def data_input(node: ir.Node) -> ir.Value | None:
    """The input that carries the tensor through a layout/slice op (input 0)."""
    return node.inputs[0] if node.inputs else None


def non_constant_inputs(node: ir.Node) -> list[ir.Value]:
    return [v for v in node.inputs if v is not None and not is_constant(v)]


def topo_index(graph: ir.Graph) -> dict[int, int]:
    """``id(node) -> position`` in the (topologically sorted) main graph."""
    return {id(n): i for i, n in enumerate(graph)}


# ----------------------------------------------------------------------- constants

_FOLDABLE = frozenset(
    {
        "Identity",
        "Cast",
        "Reshape",
        "Unsqueeze",
        "Squeeze",
        "Concat",
        "Mul",
        "Div",
        "Add",
        "Sub",
        "Sqrt",
        "Reciprocal",
        "Neg",
        "Pow",
        "Transpose",
        "Gather",
        "Slice",
        "Flatten",
        "CastLike",
        "Expand",
    }
)
_CONST_CACHE_LIMIT = 1 << 22  # elements; do not fold large tensors, they are weights


_CACHE: dict[str, dict[int, object]] | None = None


@contextlib.contextmanager
def memoized():
    """Cache constant lookups (``is_constant``, ``const_array``) while inside the
    block. Only for read-only phases (``analyze`` uses it): a rewrite inside the block
    would see stale answers."""
    global _CACHE
    outer = _CACHE
    if outer is None:
        _CACHE = {"is_constant": {}, "const_array": {}}
    try:
        yield
    finally:
        if outer is None:
            _CACHE = None


def constant_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor object behind :func:`stored_array` (its data not read: shapes and dtypes
    of large weights come from here)."""
    if value is None:
        return None
    if value.const_value is not None and not value.is_graph_input():
        return value.const_value
    node = value.producer()
    if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
        for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
            attr = node.attributes.get(key)
            if attr is None:
                continue
            if attr.type == ir.AttributeType.TENSOR:
                return attr.value
            return ir.tensor(np.array(attr.value, dtype=np.float32 if "float" in key else np.int64))
    return None


_NEVER_CONSTANT = frozenset(
    {"Shape", "Size", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"}
)


def is_constant(value: ir.Value | None) -> bool:
    """True when ``value`` does not depend on any graph input (folding is possible)."""
    if value is None:
        return True
    cache = _CACHE["is_constant"] if _CACHE is not None else None
    if cache is not None and id(value) in cache:
        return cache[id(value)]  # type: ignore[return-value]
    result = _is_constant(value, 0, cache)
    return result


def _is_constant(value: ir.Value, depth: int, cache) -> bool:
    if cache is not None and id(value) in cache:
        return cache[id(value)]
    if value.is_graph_input():
        result = False
    elif constant_tensor(value) is not None:
        result = True
    else:
        node = value.producer()
        if node is None or depth > 24 or node.op_type in _NEVER_CONSTANT:
            result = False
        else:
            result = all(_is_constant(v, depth + 1, cache) for v in node.inputs if v is not None)
    if cache is not None:
        cache[id(value)] = result
    return result


def stored_array(value: ir.Value | None) -> np.ndarray | None:
    """The array an initializer (not a graph input) or a ``Constant`` node output holds, else
    None. No folding: this is the data an edit of that constant replaces."""
    tensor = constant_tensor(value)
    return None if tensor is None else tensor.numpy()


def unmap(value: ir.Value | None) -> None:
    """Let go of the memory map behind a constant still in an external data file: the pages read
    from it leave the process's memory (the file is mapped again when next read). A map that
    arrays still view stays."""
    tensor = constant_tensor(value)
    if isinstance(tensor, ir.ExternalTensor):
        with contextlib.suppress(BufferError):
            tensor.release()


def const_array(value: ir.Value | None, _depth: int = 0) -> np.ndarray | None:
    """The array ``value`` always equals, folded through small constant arithmetic
    (``Identity``, ``Cast``, ``Reshape``, ``Concat``, ``Mul``, ``Transpose``...) when it is not
    stored itself, else None: what a node sees. Weights (large tensors) are returned as stored,
    never copied by folding. To read the data an edit would replace, use :func:`stored_array`."""
    if value is None:
        return None
    cache = _CACHE["const_array"] if _CACHE is not None else None
    if cache is not None:
        if id(value) not in cache:
            cache[id(value)] = _const_array(value, _depth)
        return cache[id(value)]  # type: ignore[return-value]
    return _const_array(value, _depth)


def _const_array(value: ir.Value, _depth: int) -> np.ndarray | None:
    tensor = constant_tensor(value)
    if tensor is not None:
        try:
            return tensor.numpy()
        except Exception:  # noqa: BLE001 - unknown storage: treat as not-constant
            return None
    node = producer(value)
    if node is None or _depth > 16 or node.op_type not in _FOLDABLE or node.domain not in ("", "ai.onnx"):
        return None
    args = []
    for v in node.inputs:
        if v is None:
            args.append(None)
            continue
        a = const_array(v, _depth + 1)
        if a is None:
            return None
        if a.size > _CONST_CACHE_LIMIT:
            return None
        args.append(a)
    try:
        return _fold(node, args)
    except Exception:  # noqa: BLE001 - unusual attribute combinations: give up quietly
        return None


def _fold(node: ir.Node, a: list[np.ndarray | None]) -> np.ndarray | None:
    op, attrs = node.op_type, node.attributes
    if op in ("Identity",):
        return a[0]
    if op == "Cast":
        return a[0].astype(ir.DataType(attrs.get_int("to")).numpy())
    if op == "CastLike":
        return a[0].astype(a[1].dtype)
    if op == "Reshape":
        shape = [int(s) for s in a[1]]
        shape = [
            a[0].shape[i] if s == 0 and not attrs.get_int("allowzero", 0) else s for i, s in enumerate(shape)
        ]
        return a[0].reshape(shape)
    if op == "Unsqueeze":
        axes = a[1] if len(a) > 1 and a[1] is not None else attrs.get_ints("axes")
        out = a[0]
        for ax in sorted(int(x) if x >= 0 else int(x) + out.ndim + len(axes) for x in axes):
            out = np.expand_dims(out, ax)
        return out
    if op == "Squeeze":
        axes = a[1] if len(a) > 1 and a[1] is not None else attrs.get_ints("axes")
        return np.squeeze(a[0], axis=None if axes is None else tuple(int(x) for x in axes))
    if op == "Concat":
        return np.concatenate([x for x in a if x is not None], axis=attrs.get_int("axis", 0))
    if op == "Flatten":
        axis = attrs.get_int("axis", 1)
        return a[0].reshape(int(np.prod(a[0].shape[:axis])), -1)
    if op == "Transpose":
        return np.transpose(a[0], attrs.get_ints("perm"))
    if op == "Gather":
        return np.take(a[0], a[1], axis=attrs.get_int("axis", 0))
    if op == "Slice":
        starts, ends = a[1], a[2]
        axes = a[3] if len(a) > 3 and a[3] is not None else range(len(starts))
        steps = a[4] if len(a) > 4 and a[4] is not None else [1] * len(starts)
        index = [slice(None)] * a[0].ndim
        for s, e, ax, st in zip(starts, ends, axes, steps, strict=False):
            index[int(ax)] = slice(int(s), int(e), int(st))
        return a[0][tuple(index)]
    if op == "Expand":
        return a[0] * np.ones(tuple(int(x) for x in a[1]), dtype=a[0].dtype)
    if op == "Sqrt":
        return np.sqrt(a[0])
    if op == "Reciprocal":
        return 1.0 / a[0]
    if op == "Neg":
        return -a[0]
    if op == "Pow":
        return np.power(a[0], a[1])
    if op == "Mul":
        return a[0] * a[1]
    if op == "Add":
        return a[0] + a[1]
    if op == "Sub":
        return a[0] - a[1]
    if op == "Div":
        if np.issubdtype(a[0].dtype, np.integer):
            return a[0] // a[1]
        return a[0] / a[1]
    return None


def const_scalar(value: ir.Value | None) -> float | None:
    """A constant with exactly one element (any rank) as a float, else None."""
    arr = const_array(value)
    if arr is None or arr.size != 1:
        return None
    try:
        return float(arr.reshape(()))
    except (TypeError, ValueError):
        return None


def is_scalar_scale(node: ir.Node) -> bool:
    """A Mul by a constant scalar (a configured multiplier, as Granite's residual one)."""
    return node.op_type == "Mul" and any(const_scalar(v) is not None for v in node.inputs)


def shape_elements(value: ir.Value | None, _depth: int = 0) -> list[int | None] | None:
    """Elements of a 1-D shape tensor, with None where an element is dynamic.

    Sees through ``Concat`` of constants and ``Unsqueeze(Gather(Shape(x)))`` pieces,
    as exporters emit for ``x.view(batch, seq, heads, head_size)``. None when the
    length itself is unknown.
    """
    if value is None or _depth > 12:
        return None
    arr = const_array(value)
    if arr is not None:
        return [int(x) for x in np.asarray(arr).reshape(-1)] if arr.ndim <= 1 else None
    node = producer(value)
    if node is None:
        return None
    if node.op_type == "Concat":
        out: list[int | None] = []
        for v in node.inputs:
            part = shape_elements(v, _depth + 1)
            if part is None:
                return None
            out.extend(part)
        return out
    if node.op_type in ("Unsqueeze", "Cast", "Identity", "Squeeze", "Reshape"):
        length = _static_length(value)
        if node.op_type in ("Unsqueeze", "Squeeze", "Reshape") and length is None:
            inner = shape_elements(node.inputs[0], _depth + 1)
            if inner is not None:
                return [None] * len(inner) if node.op_type != "Unsqueeze" else inner
            # Unsqueeze of a scalar → one element
            if node.op_type == "Unsqueeze" and _is_scalar_like(node.inputs[0]):
                return [None]
            return None
        inner = shape_elements(node.inputs[0], _depth + 1)
        return inner
    if node.op_type == "Shape":
        shape = node.inputs[0].shape if node.inputs[0] is not None else None
        if shape is None:
            return None
        dims = [d if isinstance(d, int) else None for d in shape]
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end")
        return dims[start:end]
    if node.op_type in ("Gather",):
        idx = const_array(node.inputs[1])
        if idx is not None and idx.ndim == 0:
            return [None]
        if idx is not None and idx.ndim == 1:
            return [None] * idx.size
    length = _static_length(value)
    return [None] * length if length is not None else None


def _static_length(value: ir.Value) -> int | None:
    shape = value.shape
    if shape is not None and len(shape) == 1 and isinstance(shape[0], int):
        return shape[0]
    return None


def _is_scalar_like(value: ir.Value | None) -> bool:
    if value is None:
        return False
    if value.shape is not None and len(value.shape) == 0:
        return True
    node = producer(value)
    if node is None:
        return False
    if node.op_type == "Gather":
        idx = const_array(node.inputs[1])
        return idx is not None and idx.ndim == 0
    if node.op_type in ("Cast", "Identity", "Div", "Mul", "Add", "Sub", "Squeeze"):
        return _is_scalar_like(node.inputs[0])
    return False


# ------------------------------------------------------------------------- weights


def find_weight(value: ir.Value | None, max_depth: int = 6) -> tuple[ir.Value, bool, list[ir.Node]] | None:
    """The stored constant weight behind a MatMul/Gemm operand.

    Returns ``(weight_value, transposed, via_nodes)``: ``weight_value`` is the
    initializer (or ``Constant`` output) holding the data, ``transposed`` is True
    when a 2-D ``Transpose`` lies between the stored tensor and the operand, and
    ``via_nodes`` are the nodes walked through (Identity/Cast/Transpose/
    DequantizeLinear). None when the operand is not constant.
    """
    via: list[ir.Node] = []
    transposed = False
    cur = value
    for _ in range(max_depth):
        if cur is None:
            return None
        tensor = constant_tensor(cur)
        if tensor is not None:
            return cur, transposed, via
        node = producer(cur)
        if node is None:
            return None
        if node.op_type in ("Identity", "Cast", "CastLike", "DequantizeLinear", "Reshape"):
            if node.op_type == "Reshape" and not is_constant(node.inputs[1]):
                return None
            via.append(node)
            cur = node.inputs[0]
            continue
        if node.op_type == "Transpose":
            perm = node.attributes.get_ints("perm")  # None: reverse all axes (a matrix transpose for 2-D)
            if perm is None or len(perm) >= 2 and list(perm[-2:]) == [len(perm) - 1, len(perm) - 2]:
                transposed = not transposed
            via.append(node)
            cur = node.inputs[0]
            continue
        return None
    return None


def tensor_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """Static shape of a constant value (initializer or Constant), else of its type info."""
    tensor = constant_tensor(value)
    if tensor is not None:
        return tuple(int(d) for d in tensor.shape)
    if value is not None and value.shape is not None and all(isinstance(d, int) for d in value.shape):
        return tuple(int(d) for d in value.shape)
    return None


def numel(shape: Iterable[int]) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out
