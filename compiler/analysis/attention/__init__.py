"""Find attention blocks by dataflow.

Decomposed attention is anchored on each ``Softmax`` (:mod:`.decomposed`);
fused attention nodes are read through the table of fused ops (:mod:`.fused`,
:mod:`.fused_ops`). Both find the projections the same way (:mod:`.paths`)
and end the same way here: the core's nodes, and the constants that encode its head
counts (:mod:`.heads`).
"""

from __future__ import annotations

import onnx_ir as ir

from onnxpress.analysis.attention.decomposed import match_decomposed
from onnxpress.analysis.attention.fused import match_fused
from onnxpress.analysis.attention.fused_ops import spec_for
from onnxpress.analysis.attention.heads import head_shape_nodes
from onnxpress.analysis.attention.masks import padding_source
from onnxpress.analysis.attention.paths import core_nodes
from onnxpress.analysis.linear import LinearIndex
from onnxpress.analysis.structures import Attention, Linear


class AttentionFinder:
    """Finds every attention block of one graph (decomposed and fused)."""

    def __init__(self, graph: ir.Graph, index: LinearIndex):
        self.graph = graph
        self.index = index
        self.notes: list[str] = []  # what looked like attention but was not recognised, and why
        self._order: dict[int, int] | None = None
        self._padding: dict[int, tuple[ir.Value | None, bool]] = {}

    def find(self) -> list[Attention]:
        found: list[Attention] = []
        for node in self.graph:
            att = None
            if node.op_type == "Softmax" and node.domain in ("", "ai.onnx"):
                att = match_decomposed(self, node)
            elif (spec := spec_for(node)) is not None:
                att = match_fused(self, node, spec)
            if att is not None:
                found.append(att)
        return found

    def core(self, projections: list[Linear], o: Linear | None, last: ir.Node) -> list[ir.Node]:
        """Nodes between the projections and ``o`` (or ``last``), in graph order."""
        if self._order is None:
            self._order = {id(n): i for i, n in enumerate(self.graph)}
        return core_nodes(self.index, self._order, projections, o, last)

    def padding_source(self, mask: ir.Value) -> tuple[ir.Value | None, bool]:
        """:func:`~.attention_masks.padding_source`, once per mask value (layers share masks)."""
        if id(mask) not in self._padding:
            self._padding[id(mask)] = padding_source(mask)
        return self._padding[id(mask)]

    def finish(self, att: Attention, nodes: list[ir.Node]) -> None:
        """Give ``att`` its core ``nodes`` and the head-count constants among them."""
        att.nodes = nodes
        att.head_shape_nodes, att.head_shape_values = head_shape_nodes(nodes, att)
