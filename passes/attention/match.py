"""Decide, for one analysed attention core, whether one fused node can replace it.

The analysis map records what a fused node needs (see :class:`~onnxpress.analysis.Attention`):
the Q/K/V tensors to read, with their axis labels and KV cache (``q_path`` / ``k_path`` /
``v_path``), the scale to apply to them (``path_scale``) and the mask terms between scores
and Softmax (``mask_terms``). This module checks that the builder can take those - layouts
it can pack, a KV cache on both K and V, a recognisable repeat-KV expansion for
grouped-query heads, scores that are ``scale * q @ k^T + terms`` - and finds the
``[B, S, H*D]`` value the head merge after the context MatMul produces (the fused op's
output replaces it).

Anything not understood makes :func:`match_site` return a reason string instead of a
site, so the pass skips that layer and says why rather than guessing.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from onnxpress.analysis import Attention, MaskTerm, OperandPath
from onnxpress.analysis.graph_utils import data_consumers, shape_elements
from onnxpress.analysis.structures import PACKED


@dataclass
class Site:
    """One attention core to substitute: the analysis' record plus where the output goes."""

    att: Attention
    merged: ir.Value | None  # [B, S, H*D] value after the head merge (None: rebuild BHSD instead)
    context_out: ir.Value  # the context MatMul output [B, H, S, D]
    anchor: ir.Node  # fused nodes go right after this node

    @property
    def q(self) -> OperandPath:
        return self.att.q_path

    @property
    def k(self) -> OperandPath:
        return self.att.k_path

    @property
    def v(self) -> OperandPath:
        return self.att.v_path

    @property
    def scale(self) -> float:
        return self.att.path_scale

    @property
    def terms(self) -> list[MaskTerm]:
        return self.att.mask_terms

    @property
    def past_key(self) -> ir.Value | None:
        return self.k.past

    @property
    def past_value(self) -> ir.Value | None:
        return self.v.past


def match_site(att: Attention) -> Site | str:
    """A :class:`Site` for a decomposed attention core, or why it cannot be substituted."""
    if att.kind != "decomposed":
        return f"already fused ({att.kind})"
    if att.scores_matmul is None or att.context_matmul is None or att.softmax is None or att.q_path is None:
        return "no scores/context MatMul in the map"
    if att.scores_matmul.op_type != "MatMul" or att.softmax.attributes.get_int("axis", -1) not in (-1, 3):
        return "scores are not a plain MatMul + last-axis Softmax"
    q, k, v = att.q_path, att.k_path, att.v_path
    for name, path in (("Q", q), ("K", k), ("V", v)):
        if sorted(path.axes) != sorted("BHSD") and path.axes != PACKED:
            return f"{name} operand has an unexpected layout ({path.axes})"
    if q.past is not None or (k.past is None) != (v.past is None):
        return "KV cache only on one of K and V"
    if k.repeated != v.repeated or (att.num_kv_heads != att.num_heads and not k.repeated):
        return "grouped-query heads without a recognisable repeat-KV expansion"
    if att.scores_problem:
        return att.scores_problem
    merged = _merged_output(att.context_matmul, att.num_heads, att.head_size)
    return Site(att, merged, att.context_matmul.outputs[0], att.context_matmul)


def _merged_output(context: ir.Node, heads: int, head_size: int) -> ir.Value | None:
    """``Transpose(0,2,1,3) -> Reshape([B, S, H*D])`` after the context MatMul."""
    users = data_consumers(context.outputs[0])
    if len(users) != 1 or users[0].op_type != "Transpose":
        return None
    perm = users[0].attributes.get_ints("perm")
    if perm is None or list(perm) != [0, 2, 1, 3]:
        return None
    users = data_consumers(users[0].outputs[0])
    if len(users) != 1 or users[0].op_type != "Reshape":
        return None
    dims = shape_elements(users[0].inputs[1])
    if dims is None or len(dims) != 3 or dims[2] not in (heads * head_size, -1, None):
        return None
    return users[0].outputs[0]
