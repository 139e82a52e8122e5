"""The weight matrices of a transformer by role, as ``y = x @ W (+ b)`` with W [d_in, d_out].

The low-rank and weight-sharing passes pick the matrices they factorise from here: roles
of the analysis map (``layer3.ffn.up``, ``layer0.attn.q``, ...) or regexes on node and
weight names of any constant-weight MatMul/Gemm. :func:`residual_add` finds where a
projection's output joins the residual stream (pruning and low-rank fitting use it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import onnx_ir as ir

from onnxpress.analysis.graph_utils import const_array, consumers, is_constant, is_scalar_scale
from onnxpress.analysis.linear import as_linear

ROLES = ("ffn.up", "ffn.gate", "ffn.down", "attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o")


@dataclass
class Matrix:
    """One weight matrix to split, with the effective W [d_in, d_out] of ``y = x @ W (+ b)``."""

    key: str  # e.g. "layer3.ffn.up" or the node name
    node: ir.Node  # the MatMul or Gemm
    input: ir.Value  # x
    weight: np.ndarray  # effective W, float64
    bias: np.ndarray | None  # effective bias (Gemm: beta * C; MatMul: the Add's constant)
    bias_value: ir.Value | None  # the constant bias input (of the Add or the Gemm)
    bias_node: ir.Node | None  # the Add (MatMul + Add); None for Gemm or no bias
    dtype: ir.DataType
    layer: int | None = None

    @property
    def d_in(self) -> int:
        return self.weight.shape[0]

    @property
    def d_out(self) -> int:
        return self.weight.shape[1]


def matrix_of(lin, key: str, layer: int | None) -> Matrix | None:
    """The effective W of an analysis ``Linear`` (MatMul or Gemm with a float weight that
    folds to a constant 2-D matrix), or None for kinds this pass leaves alone
    (quantized MatMulNBits, fused attention weights, transA Gemm)."""
    node = lin.node
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm"):
        return None
    w = const_array(node.inputs[1])  # through Identity/Transpose/Cast: the matrix the node sees
    if w is None or w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
        return None
    bias = const_array(lin.bias) if lin.bias is not None else None
    if node.op_type == "Gemm":
        attrs = {k: a.value for k, a in node.attributes.items()}
        if attrs.get("transA", 0):
            return None
        w = attrs.get("alpha", 1.0) * (w.T if attrs.get("transB", 0) else w)
        if lin.bias_node is None and bias is not None:  # Gemm's own C
            bias = attrs.get("beta", 1.0) * bias
    if bias is not None:
        if bias.size != w.shape[1]:
            return None  # C broadcast over rows (or a stranger shape): not a per-channel bias
        bias = bias.reshape(-1).astype(np.float64)
    return Matrix(key, node, lin.input, w.astype(np.float64), bias, lin.bias, lin.bias_node,
                  ir.DataType.from_numpy(w.dtype), layer)


def _linears_by_role(tmap) -> list[tuple[str, int, object]]:
    found = []
    for layer in tmap.layers:
        att, ffn = layer.attention, layer.ffn
        pairs = []
        if att is not None and att.fused_node is None:
            pairs += [("attn.q", att.q), ("attn.k", att.k), ("attn.v", att.v), ("attn.qkv", att.qkv), ("attn.o", att.o)]
        if ffn is not None and not ffn.packed_gate_up:
            pairs += [("ffn.up", ffn.up), ("ffn.gate", ffn.gate), ("ffn.down", ffn.down)]
        elif ffn is not None:
            pairs += [("ffn.up", ffn.up), ("ffn.down", ffn.down)]  # packed [gate | up]: one matrix
        found += [(role, layer.index, lin) for role, lin in pairs if lin is not None]
    return found


def select_matrices(model: ir.Model, include: list[str], tmap=None) -> list[Matrix]:
    """The matrices named by ``include``: roles from the analysis map ``tmap``, regexes
    searched in the node name and the weight name of every constant-weight MatMul/Gemm."""
    roles = {p for p in include if p in ROLES}
    patterns = [re.compile(p) for p in include if p not in ROLES]
    chosen: dict[int, Matrix] = {}  # by node id: a node matched twice is split once
    if roles and tmap is not None:
        for role, index, lin in _linears_by_role(tmap):
            if role in roles and id(lin.node) not in chosen:
                m = matrix_of(lin, f"layer{index}.{role}", index)
                if m is not None:
                    chosen[id(lin.node)] = m
    if patterns:
        for node in model.graph:
            if id(node) in chosen:
                continue
            lin = as_linear(node)
            if lin is None:
                continue
            names = [node.name or "", lin.weight.name or ""]
            if any(p.search(n) for p in patterns for n in names):
                m = matrix_of(lin, node.name or lin.weight.name or node.outputs[0].name, None)
                if m is not None:
                    chosen[id(node)] = m
    return list(chosen.values())



# What may lie between a projection's output and the residual Add it feeds: its bias Add
# and ops that leave the values alone (GPT-2's Conv1D reshapes back to [batch, seq, d]).
RESIDUAL_PATH_OPS = frozenset({"Add", "Dropout", "Cast", "Reshape", "Identity"})


class ResidualJoin(NamedTuple):
    add: ir.Node  # the residual Add; its output is the stream after the projection's update
    stream: ir.Value | None  # its other input: the stream before (None for x + x)


def residual_add(output: ir.Value, residual_adds: Iterable[ir.Node] = (), *, depth: int = 4
                 ) -> ResidualJoin | None:
    """Where a projection's ``output`` (after its bias) is added to the residual stream, as for
    attention O and FFN down projections: the first node met that is one of the analysis'
    ``residual_adds`` or an Add of two non-constant tensors, looking at the readers of
    ``output`` and, ``depth`` levels deep, through :data:`RESIDUAL_PATH_OPS`. None if none."""
    joins = {id(n) for n in residual_adds}
    frontier = [output]
    for _ in range(depth):
        nxt = []
        for value in frontier:
            for node in consumers(value):
                plain_add = node.op_type == "Add" and node.domain in ("", "ai.onnx")
                if id(node) in joins or (plain_add and not any(is_constant(v) for v in node.inputs)):
                    stream = next((v for v in node.inputs if v is not None and v is not value
                                   and not is_constant(v)), None)
                    return ResidualJoin(node, stream)
                if node.op_type in RESIDUAL_PATH_OPS or is_scalar_scale(node):
                    nxt.append(node.outputs[0])
        frontier = nxt
    return None
