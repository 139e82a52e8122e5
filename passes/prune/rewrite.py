"""Graph rewriting shared by the pruning passes: read a projection's weight as
[d_in, d_out], write sliced or refitted weights back (sharing-safe), patch the shape
constants between the projections, and find the region of the graph a rewrite touches.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnxpress.analysis.graph_utils import ancestors, const_array, shape_elements, stored_array, walk_down
from onnxpress.editing import GraphEditor
from onnxpress.errors import OnnxpressError

if TYPE_CHECKING:
    from onnxpress.analysis import Linear


def _check_plain(linear: Linear) -> None:
    if linear.node.op_type not in ("MatMul", "Gemm", "Attention", "FusedMatMul") or any(
        n.op_type in ("DequantizeLinear", "Reshape") for n in linear.weight_via
    ):
        raise OnnxpressError(
            f"cannot prune {linear.name} ({linear.node.op_type}): its weight is quantized or reshaped; "
            "run the pruning passes before quantization"
        )


def read_weight(linear: Linear) -> np.ndarray:
    """The weight as [d_in, d_out] float64."""
    _check_plain(linear)
    w = stored_array(linear.weight)
    if w is None:
        raise OnnxpressError(f"cannot read the weight of {linear.name} (please report this bug)")
    w = w.astype(np.float64)
    return w.T if linear.transposed else w


def read_bias(linear: Linear) -> np.ndarray | None:
    b = stored_array(linear.bias)
    return None if b is None else b.astype(np.float64).reshape(-1)


def write_linear(
    editor: GraphEditor,
    linear: Linear,
    weight: np.ndarray,
    bias: np.ndarray | None,
    *,
    add_bias: bool = False,
) -> None:
    """Store ``weight`` ([d_in', d_out']) and ``bias`` into ``linear`` (same dtypes and
    layout as before). A bias given for a layer without one is added as an ``Add``
    only when ``add_bias``; otherwise it is dropped."""
    old = stored_array(linear.weight)
    stored = weight.T if linear.transposed else weight
    users = [linear.node, *linear.weight_via]
    editor.set_constant(linear.weight, stored.astype(old.dtype), users)
    if bias is None:
        return
    if linear.bias is not None:
        old_b = stored_array(linear.bias)
        lead = (1,) * (old_b.ndim - 1)
        users = [linear.bias_node] if linear.bias_node is not None else [linear.node]
        editor.set_constant(linear.bias, bias.reshape(*lead, -1).astype(old_b.dtype), users)
    elif add_bias and np.any(bias != 0):
        _append_bias(editor, linear, bias.astype(old.dtype))


def _append_bias(editor: GraphEditor, linear: Linear, bias: np.ndarray) -> None:
    out = linear.output
    uses = list(out.uses())
    b = editor.add_initializer(f"{linear.name}.bias", bias)
    add = ir.node("Add", [out, b], name=editor.fresh_name(f"{linear.name}/bias_add"))
    add.outputs[0].name = editor.fresh_name(f"{out.name}_biased")
    add.outputs[0].type = ir.TensorType(ir.DataType.from_numpy(bias.dtype))
    editor.graph.insert_after(out.producer(), add)
    for use in uses:
        use.node.replace_input_with(use.idx, add.outputs[0])
    if out.is_graph_output():
        outputs = editor.graph.outputs
        outputs[outputs.index(out)] = add.outputs[0]


def clear_shapes(values: Iterable[ir.Value]) -> None:
    """Forget recorded shapes that slicing made stale (graph inputs/outputs excluded):
    ONNX Runtime trusts value_info and would reject the mismatch."""
    for value in values:
        if value is not None and not value.is_graph_input() and not value.is_graph_output() \
                and not value.is_initializer():
            value.shape = None


def region_between(starts: Sequence[ir.Value], stop: ir.Node) -> list[ir.Node]:
    """Nodes on the data paths from ``starts`` into ``stop``: downstream of the starts
    and upstream of ``stop``'s inputs. (Shape side branches that read a value on the
    way but lead past ``stop``, e.g. GPT-2's output-reshape target, are excluded.)"""

    start_ids = {id(v.producer()) for v in starts}
    upstream = ancestors([v for v in stop.inputs if v is not None], stop=lambda n: id(n) in start_ids)
    up_ids = {id(n) for n in upstream}
    forward = walk_down(list(starts), lambda n: n is not stop and id(n) in up_ids, limit=20_000)
    return [n for n in forward if id(n) in up_ids]


def write_shape(editor: GraphEditor, value: ir.Value, old: list, new: list, users: list[ir.Node]) -> None:
    """Write the changed elements of a 1-D shape tensor back into the constants it is
    built from (a constant, a Concat of pieces, an Unsqueeze/Cast of a constant).
    Pieces computed at run time (``Shape`` of a tensor) are already right."""

    arr = const_array(value)
    if arr is not None:
        editor.set_constant(value, np.asarray(new, dtype=arr.dtype).reshape(arr.shape), users)
        return
    node = value.producer()
    if node is None:
        return
    if node.op_type == "Concat":
        off = 0
        for piece in node.inputs:
            part = shape_elements(piece)
            if part is None:
                raise OnnxpressError(f"cannot patch the shape built by {node.name} (please report this bug)")
            n = len(part)
            if old[off:off + n] != new[off:off + n]:
                write_shape(editor, piece, old[off:off + n], new[off:off + n], [node])
            off += n
    elif node.op_type in ("Unsqueeze", "Cast", "Identity", "Squeeze") and const_array(node.inputs[0]) is not None:
        src_arr = const_array(node.inputs[0])
        editor.set_constant(node.inputs[0], np.asarray(new, dtype=src_arr.dtype).reshape(src_arr.shape), [node])


def group_columns(indices: Iterable[int], width: int, offset: int = 0) -> np.ndarray:
    idx = [offset + i * width + j for i in indices for j in range(width)]
    return np.asarray(idx, dtype=np.int64)
