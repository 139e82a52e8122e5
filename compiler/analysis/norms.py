"""Find normalisations: fused ops and decomposed LayerNorm / RMSNorm patterns.

Decomposed norms are anchored on the variance ``ReduceMean`` (its input is
``Pow(x, 2)`` or ``x * x``); ``x`` being ``input - ReduceMean(input)`` makes it a
LayerNorm, otherwise an RMSNorm. The pattern extends forward through the
normalising ``Mul``/``Div``, ``Cast`` and the constant gamma ``Mul`` / beta ``Add``;
its last node stands for the norm in :class:`Layer.norms`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import onnx_ir as ir

from onnxpress.analysis.graph_utils import (
    FUSED_NORM_OPS,
    const_scalar,
    consumers,
    data_consumers,
    is_constant,
    producer,
)


@dataclass
class Norm:
    node: ir.Node  # the fused node, or the last node of a decomposed pattern
    kind: str  # "LayerNorm" | "RMSNorm" | op type of a fused norm
    input: ir.Value  # the value normalised
    output: ir.Value  # the normalised (scaled, shifted) value
    nodes: list[ir.Node] = field(default_factory=list)  # all nodes of the pattern
    skip: bool = False  # a Skip*Norm: it also performs the residual add
    weights: list[ir.Value] = field(default_factory=list)  # gamma / beta


def find_norms(graph: ir.Graph) -> list[Norm]:
    norms: list[Norm] = []
    for node in graph:
        if node.op_type in FUSED_NORM_OPS:
            if node.op_type == "EmbedLayerNormalization":
                continue  # belongs to the embeddings, not to a layer
            weights = [v for v in node.inputs[1:] if v is not None and is_constant(v)]
            skip = node.op_type.startswith("Skip")
            norms.append(Norm(node, node.op_type, node.inputs[0], node.outputs[0], [node], skip, weights))
        elif node.op_type == "ReduceMean":
            norm = _decomposed(node)
            if norm is not None:
                norms.append(norm)
    return norms


def _decomposed(reduce: ir.Node) -> Norm | None:
    sq = producer(reduce.inputs[0])
    if sq is None:
        return None
    if sq.op_type == "Pow" and const_scalar(sq.inputs[1]) == 2.0:
        centered = sq.inputs[0]
    elif sq.op_type == "Mul" and sq.inputs[0] is sq.inputs[1]:
        centered = sq.inputs[0]
    else:
        return None
    nodes = [sq, reduce]
    kind = "RMSNorm"
    source = centered
    p = producer(centered)
    if p is not None and p.op_type == "Sub":
        mean = producer(p.inputs[1])
        if mean is not None and mean.op_type == "ReduceMean" and mean.inputs[0] is p.inputs[0]:
            kind = "LayerNorm"
            source = p.inputs[0]
            nodes = [mean, p, *nodes]
    # the normalising Mul/Div: consumes `centered` and something computed from `reduce`
    scale_nodes = _downstream(
        reduce.outputs[0], {"Add", "Sqrt", "Reciprocal", "Div", "Pow", "Cast", "Max"}, 8
    )
    scale_values = {id(o) for n in scale_nodes for o in n.outputs} | {id(reduce.outputs[0])}
    normed = None
    for c in consumers(centered):
        if c.op_type in ("Mul", "Div") and any(id(v) in scale_values for v in c.inputs if v is not None):
            normed = c
            break
    if normed is None:
        return None
    inner = {id(n) for n in scale_nodes}
    nodes += [n for n in scale_nodes if id(n) in inner and _feeds(n, normed)] + [normed]
    # extend through Cast and the constant gamma / beta
    last, out, weights = normed, normed.outputs[0], []
    while True:
        users = data_consumers(out)
        if len(users) != 1 or out.is_graph_output():
            break
        u = users[0]
        if u.op_type == "Cast":
            pass
        elif u.op_type in ("Mul", "Add"):
            other = u.inputs[1] if u.inputs[0] is out else u.inputs[0]
            if other is None or not is_constant(other):
                break
            weights.append(other)
        else:
            break
        nodes.append(u)
        last, out = u, u.outputs[0]
    src_p = producer(source)
    if src_p is not None and src_p.op_type == "Cast" and src_p.outputs[0] is source and kind == "RMSNorm":
        nodes.insert(0, src_p)
        source = src_p.inputs[0]
    return Norm(last, kind, source, out, nodes, False, weights)


def _downstream(value: ir.Value, ops: set[str], limit: int) -> list[ir.Node]:
    out: list[ir.Node] = []
    queue = deque([value])
    seen: set[int] = set()
    while queue and len(out) < limit:
        v = queue.popleft()
        for node in consumers(v):
            if id(node) in seen or node.op_type not in ops:
                continue
            seen.add(id(node))
            out.append(node)
            queue.extend(node.outputs)
    return out


def _feeds(node: ir.Node, target: ir.Node) -> bool:
    targets = {id(v) for v in target.inputs if v is not None}
    queue = deque(node.outputs)
    seen: set[int] = set()
    while queue and len(seen) < 16:
        v = queue.popleft()
        if id(v) in targets:
            return True
        for c in consumers(v):
            if id(c) not in seen:
                seen.add(id(c))
                queue.extend(c.outputs)
    return False
