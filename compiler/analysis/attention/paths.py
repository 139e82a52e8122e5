"""Walks between an attention core and its projections.

Up from an attention operand (a scores / context MatMul operand, or a fused node's input)
through "transparent" ops - head split/merge (Reshape/Transpose), repeat-KV (Expand/Tile/
Concat), KV-cache Concat, rotary (Mul/Add/Neg/Slice/Concat with cos/sin), per-head norms
and scaling - to the nearest constant-weight projection; down from the core's output
through layout ops to the output projection. And what those walks show: the core's nodes,
rotary embeddings, the KV-cache graph inputs and outputs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import onnx_ir as ir

from onnxpress.analysis.graph_utils import (
    ELEMENTWISE_OPS,
    FUSED_NORM_OPS,
    LAYOUT_OPS,
    UpWalk,
    const_array,
    consumers,
    is_constant,
    producer,
    walk_to_linears,
)
from onnxpress.analysis.linear import LinearIndex
from onnxpress.analysis.structures import Linear

# Ops crossed when walking from the scores/context operands up to the projections.
_RMS_PARTS = frozenset({"Pow", "ReduceMean", "Sqrt", "Reciprocal", "ReduceSumSquare", "ReduceL2"})
_UP_OPS = (
    LAYOUT_OPS
    | ELEMENTWISE_OPS
    | _RMS_PARTS
    | FUSED_NORM_OPS
    | {"Expand", "Tile", "Concat", "Split", "Slice", "Gather", "RotaryEmbedding", "IsNaN"}
)
_ROTARY_OPS = frozenset({"RotaryEmbedding", "Cos", "Sin"})
# Ops crossed from the context MatMul (or fused output) down to the output projection.
_CTX_OPS = LAYOUT_OPS | {"Concat"}


@dataclass
class Trace(UpWalk):
    """What a walk from an attention operand up to its projection found."""

    fused_rotary: bool = False

    @property
    def linear(self) -> Linear | None:
        return self.linears[0] if self.linears else None


def trace_up(start: ir.Value, index: LinearIndex, limit: int = 400) -> Trace:
    """Walk from an attention operand up to the constant-weight projection(s)."""
    walk = walk_to_linears(start, index.for_value, _follow, limit)
    fused_rotary = any(n.op_type == "RotaryEmbedding" for n in walk.nodes)
    return Trace(walk.linears, walk.graph_inputs, walk.nodes, walk.foreign, fused_rotary)


def _follow(node: ir.Node) -> list[ir.Value] | None:
    """The inputs to go on through (None: not an op the walk crosses)."""
    op = node.op_type
    if op not in _UP_OPS:
        return None
    ins = node.inputs
    if op in ("Concat",) or op in ELEMENTWISE_OPS and op != "Where":
        return [v for v in ins if v is not None and not is_constant(v)]
    if op == "Where":
        return [v for v in ins[1:] if v is not None and not is_constant(v)]
    if op == "Gather" and is_constant(ins[0]):
        return []  # a lookup table (embedding, cos/sin cache), not the projected tensor
    return [ins[0]] if ins and ins[0] is not None else []


def path_nodes(trace: Trace, lin: Linear) -> list[ir.Node]:
    """Crossed nodes that are downstream of the projection ``lin`` (excludes the cos/sin and
    shape side branches the walk also entered), nearest the attention operand first."""
    down: set[int] = set()
    queue = deque([lin.output])
    crossed = {id(n) for n in trace.nodes}
    while queue:
        value = queue.popleft()
        for node in consumers(value):
            if id(node) in crossed and id(node) not in down:
                down.add(id(node))
                queue.extend(node.outputs)
    return [n for n in trace.nodes if id(n) in down]


def find_output_projection(start: ir.Value, index: LinearIndex) -> Linear | None:
    """The projection reading the core's output ``start`` through layout ops."""
    queue = deque([start])
    seen: set[int] = set()
    while queue:
        value = queue.popleft()
        for node in consumers(value):
            if id(node) in seen or node.op_type == "Shape":
                continue
            seen.add(id(node))
            lin = index.for_node(node)
            if lin is not None and lin.input is value:
                return lin
            if node.op_type in _CTX_OPS:
                queue.extend(node.outputs[:1])
    return None


def core_nodes(index: LinearIndex, order: dict[int, int], projections: list[Linear], o: Linear | None,
               last: ir.Node) -> list[ir.Node]:
    """Nodes downstream of the Q/K/V projections and upstream of the output projection (or of
    ``last`` when there is none), in graph order."""
    stop = {id(o.node)} if o is not None else set()
    down: dict[int, ir.Node] = {}
    queue = deque(p.output for p in projections)
    while queue and len(down) < 5000:
        value = queue.popleft()
        for node in consumers(value):
            if id(node) in down or id(node) in stop or index.for_node(node) is not None:
                continue
            down[id(node)] = node
            queue.extend(node.outputs)
    core: dict[int, ir.Node] = {}
    queue = deque([o.input if o is not None else last.outputs[0]])
    while queue:
        value = queue.popleft()
        node = producer(value)
        if node is None or id(node) in core or id(node) not in down:
            continue
        core[id(node)] = node
        queue.extend(v for v in node.inputs if v is not None)
    return sorted(core.values(), key=lambda n: order.get(id(n), 0))


def is_rotary(trace: Trace, lin: Linear) -> bool:
    """Rotary embeddings on the path from ``lin`` to the operand: a fused rotary op, or a
    Mul by cos/sin (computed, or folded to constant tables)."""
    if trace.fused_rotary:
        return True
    path = path_nodes(trace, lin)
    path_ids = {id(n) for n in path}
    path_values = {id(o) for n in path for o in n.outputs} | {id(lin.output)}
    for node in path:
        if node.op_type != "Mul":
            continue
        for v in node.inputs:
            if v is None or id(v) in path_values:
                continue
            if has_ancestor(v, _ROTARY_OPS, limit=60, avoid=path_ids):
                return True
            arr = const_array(v) if is_constant(v) else None
            if arr is not None and arr.size > 1 and arr.ndim >= 2:
                return True  # cos/sin folded to constants
    return False


def has_ancestor(value: ir.Value, ops, limit: int = 40, avoid: set[int] | None = None) -> bool:
    """Some node among the first ``limit`` producers upstream of ``value`` is one of ``ops``."""
    queue = deque([value])
    seen: set[int] = set()
    while queue and len(seen) < limit:
        v = queue.popleft()
        node = producer(v)
        if node is None or id(node) in seen or (avoid and id(node) in avoid):
            continue
        seen.add(id(node))
        if node.op_type in ops:
            return True
        queue.extend(x for x in node.inputs if x is not None)
    return False


def first_past(trace: Trace) -> ir.Value | None:
    """The KV-cache graph input the walk met (4-D or named past), else any graph input met."""
    for v in trace.graph_inputs:
        if v.shape is not None and len(v.shape) == 4 or "past" in (v.name or "").lower():
            return v
    return trace.graph_inputs[0] if trace.graph_inputs else None


def present(trace: Trace) -> ir.Value | None:
    """A graph output computed on the walk (the KV-cache Concat's ``present``)."""
    for node in trace.nodes:
        for out in node.outputs:
            if out.is_graph_output():
                return out
    return None
