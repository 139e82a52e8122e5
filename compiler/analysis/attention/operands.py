"""The Q, K and V tensors a fused attention op would read in place of a decomposed core.

From a scores / context MatMul operand the walk goes up through scalar scaling,
Transpose, the repeat-KV ``Unsqueeze -> Expand -> Reshape`` and the KV-cache ``Concat``,
tracking which tensor axis means what, and stops at the first op that computes something
(rotary, a Split of a packed projection) or at the head-split Reshape of the projection
output. What stops the walk is the post-rotary tensor a fused op reads, with its axis
labels; the scalar factors crossed are the ones that op must apply itself.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxpress.analysis.attention.scores import scalar_factor
from onnxpress.analysis.graph_utils import const_array, is_constant, producer, shape_elements
from onnxpress.analysis.structures import PACKED, OperandPath, ScaleFactor

_MAX_STEPS = 64


def walk_operand(start: ir.Value, axes: str, heads: int, head_size: int, *, on: str | None,
                 start_heads: int | None = None) -> tuple[OperandPath, list[ScaleFactor]]:
    """Walk from a scores/context MatMul operand with axis labels ``axes`` up to the tensor a
    fused op reads; also the scale factors crossed. ``heads``: heads of the projection;
    ``start_heads``: heads at ``start`` (the query heads, when K/V were repeated for
    grouped-query attention); ``on``: "q" or "k" to cross scaling, None (V) to stop at it."""
    path = OperandPath(start, axes)
    factors: list[ScaleFactor] = []
    value = start
    now_heads = start_heads or heads
    for _ in range(_MAX_STEPS):
        path.trail.append((value, axes, now_heads, False))
        node = producer(value)
        if node is None or node.domain not in ("", "ai.onnx"):
            break
        kind = node.op_type
        if kind in ("Mul", "Div"):
            found = scalar_factor(node) if on is not None else None
            if found is None:
                break
            factors.append(ScaleFactor(node, found[1], on, walked=True))
            value = node.inputs[found[0]]
            continue
        if kind == "Transpose":
            perm = node.attributes.get_ints("perm")
            if perm is None or len(perm) != len(axes):
                break
            new = [""] * len(perm)
            for i, p in enumerate(perm):
                new[p] = axes[i]
            axes, value = "".join(new), node.inputs[0]
            continue
        if kind == "Reshape":
            src = _repeat_source(node) if axes[1] == "H" else None
            if src is not None:
                path.repeated, value, now_heads = True, src, heads
                path.trail.append((node.inputs[0], "", 0, False))  # the 5-D Expand output: no surrogate
                continue
            packed = _head_split_input(node, axes, heads, head_size)
            if packed is not None:
                axes, value = PACKED, packed
            break
        if kind == "Concat" and path.past is None and len(node.inputs) == 2 and axes == "BHSD":
            past, new_part = node.inputs
            if node.attributes.get_int("axis", 0) in (2, -2) and past is not None and past.is_graph_input():
                path.past, path.present, value = past, node.outputs[0], new_part
                continue
            break
        if kind == "Identity":
            value = node.inputs[0]
            continue
        break
    path.value, path.axes = value, axes
    if path.past is not None:  # values above the cache Concat hold past + new positions
        cut = next(i for i, t in enumerate(path.trail) if t[0] is path.present)
        path.trail = [(v, a, n, i <= cut) for i, (v, a, n, _) in enumerate(path.trail)]
    return path, factors


def _repeat_source(reshape: ir.Node) -> ir.Value | None:
    """Input of ``Unsqueeze(axis 2) -> Expand -> Reshape`` (repeat_kv), else None."""
    expand = producer(reshape.inputs[0])
    if expand is None or expand.op_type != "Expand":
        return None
    unsq = producer(expand.inputs[0])
    if unsq is None or unsq.op_type != "Unsqueeze":
        return None
    axes = const_array(unsq.inputs[1]) if len(unsq.inputs) > 1 else None
    axes = axes if axes is not None else unsq.attributes.get_ints("axes")
    if axes is None or [int(a) for a in np.asarray(axes).reshape(-1)] not in ([2], [-3]):
        return None
    return unsq.inputs[0]


def _head_split_input(reshape: ir.Node, axes: str, heads: int, head_size: int) -> ir.Value | None:
    """The [B, S, H*D] input of a head-split Reshape to [B, S, H, D], else None.

    The input must be known to be 3-D: from its static shape, or because it is the
    output of a MatMul projection (a MatMul keeps the [B, S] leading dims; a Gemm
    would have flattened them)."""
    if axes != "BSHD":
        return None
    dims = shape_elements(reshape.inputs[1])
    src = reshape.inputs[0]
    if dims is None or len(dims) != 4 or dims[3] != head_size or dims[2] not in (heads, -1, None):
        return None
    if src.shape is not None:
        ok = len(src.shape) == 3 and (not isinstance(src.shape[2], int) or src.shape[2] == heads * head_size)
        return src if ok else None
    node = producer(src)
    if node is not None and node.op_type == "Add":  # bias after the projection MatMul
        node = next((producer(v) for v in node.inputs if not is_constant(v)), None)
    return src if node is not None and node.op_type == "MatMul" else None
