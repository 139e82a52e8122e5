"""What an attention mask is built from: causality, and the padding input behind it.

A mask is causal when it is built from a triangle (``Trilu``), from comparing position
ranges (``kv_idx <= q_idx``) or from a constant lower-triangular buffer. A mask term is
*pure* padding (+ causal) when its data comes from one 2-D integer graph input (the
``attention_mask``) plus shapes and small constants: what a key-padding mask input and a
causal flag can express. A float table (position bias, ALiBi slopes), another input, or
positions shifted by a constant before they are compared (a sliding window,
``kv_idx > q_idx - window``) makes it something else.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import onnx_ir as ir

from onnxpress.analysis.attention.paths import has_ancestor
from onnxpress.analysis.graph_utils import const_array, is_constant, producer, walk_up

_CAUSAL_COMPARE = frozenset({"Less", "LessOrEqual", "Greater", "GreaterOrEqual"})
_MASK_DTYPES = frozenset({ir.DataType.INT64, ir.DataType.INT32, ir.DataType.BOOL, ir.DataType.UINT8})


def mask_is_causal(value: ir.Value) -> bool:
    """The mask ``value`` is built from a triangle, a position comparison or a constant
    lower-triangular buffer."""
    queue = deque([value])
    seen: set[int] = set()
    while queue and len(seen) < 400:
        v = queue.popleft()
        if v is None:
            continue
        node = producer(v)
        if node is None:
            arr = v.const_value.numpy() if v.const_value is not None and not v.is_graph_input() else None
            if arr is not None and _is_triangular(arr):
                return True
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "Trilu":
            return True
        if node.op_type in _CAUSAL_COMPARE and all(
            x is not None and not is_constant(x) and has_ancestor(x, {"Range"}, limit=30) for x in node.inputs
        ):
            return True
        if node.op_type == "Constant":
            arr = const_array(node.outputs[0])
            if arr is not None and _is_triangular(arr):
                return True
            continue
        queue.extend(x for x in node.inputs if x is not None)
    return False


def _is_triangular(arr: np.ndarray) -> bool:
    if arr.ndim < 2 or arr.shape[-1] != arr.shape[-2] or arr.shape[-1] < 2 or arr.size > 1 << 24:
        return False
    m = arr.reshape(-1, arr.shape[-2], arr.shape[-1])[0]
    if m.dtype == bool or np.issubdtype(m.dtype, np.integer):
        m = m.astype(bool)
        return bool(np.all(np.tril(m) == m) and np.all(np.diag(m))) and not bool(np.all(m))
    return False


def padding_source(value: ir.Value) -> tuple[ir.Value | None, bool]:
    """``(the 2-D integer graph input the mask is built from, pure)``: pure when that input,
    shapes and small constants are all it reads. Inputs read only through ``Shape``
    (``input_ids`` sizing the mask) do not count."""
    nodes: list[ir.Node] = []

    def through(node: ir.Node):
        nodes.append(node)
        return None if node.op_type == "Shape" else node.inputs  # sizes only: not the mask's data

    for _ in walk_up(value, through, limit=5000):
        pass
    pure = True
    read: list[ir.Value] = []
    for node in nodes:
        if node.op_type == "Shape":
            continue
        for v in node.inputs:
            if v is None:
                continue
            if v.is_graph_input():
                if v not in read:
                    read.append(v)
            elif (table := v.const_value) is not None and table.dtype.is_floating_point() and table.size > 1:
                pure = False  # a float table (position bias, slopes): not a mask
        if node.op_type == "Constant":
            arr = const_array(node.outputs[0])
            if arr is not None and np.issubdtype(arr.dtype, np.floating) and arr.size > 1:
                pure = False
        if node.op_type in ("Add", "Sub") and _shifts_positions(node):
            pure = False
    masks = [v for v in read if v.shape is not None and len(v.shape) == 2 and v.dtype in _MASK_DTYPES]
    if len(read) != len(masks) or len(masks) > 1:
        pure = False
    return (masks[0] if len(masks) == 1 else None), pure


def _shifts_positions(node: ir.Node) -> bool:
    """``node`` adds an integer constant other than +-1 to positions (a ``Range``'s values): a
    window's offset. Causal masks compare positions as they are (or one apart)."""
    for i, v in enumerate(node.inputs):
        arr = const_array(v) if v is not None else None
        other = node.inputs[1 - i] if len(node.inputs) == 2 else None
        if (arr is not None and arr.size == 1 and np.issubdtype(arr.dtype, np.integer) and abs(int(arr.ravel()[0])) > 1
                and other is not None and has_ancestor(other, {"Range"}, limit=30)):
            return True
    return False
