"""Fused attention nodes (com.microsoft Attention / MultiHeadAttention / GroupQueryAttention,
ONNX ``Attention`` (opset 23), ``onnxpress.Attention``), read through their
:class:`~onnxpress.analysis.attention.fused_ops.FusedAttentionSpec`: heads, scale and causality
from the attributes, mask and KV cache from the inputs, and the projections traced up
from the Q/K/V inputs as for a decomposed core.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnx_ir as ir

from onnxpress.analysis.attention.fused_ops import FusedAttentionSpec
from onnxpress.analysis.attention.heads import reshape_heads, static_last_dim
from onnxpress.analysis.attention.masks import mask_is_causal
from onnxpress.analysis.attention.paths import (
    find_output_projection,
    first_past,
    is_rotary,
    path_nodes,
    trace_up,
)
from onnxpress.analysis.graph_utils import is_constant, tensor_shape
from onnxpress.analysis.structures import Attention, Linear

if TYPE_CHECKING:
    from onnxpress.analysis.attention import AttentionFinder


@dataclass
class _Projected:
    """The projections a fused node reads and the head geometry they give."""

    q: Linear | None = None
    k: Linear | None = None
    v: Linear | None = None
    qkv: Linear | None = None  # packed: one projection for Q, K and V
    num_heads: int = 0
    num_kv_heads: int = 0
    head_size: int = 0
    rotary: bool = False  # rotary embeddings between the projections and the node
    past_key: ir.Value | None = None  # KV-cache graph inputs met tracing the key / value inputs
    past_value: ir.Value | None = None


def match_fused(finder: AttentionFinder, node: ir.Node, spec: FusedAttentionSpec) -> Attention | None:
    """The attention block of the fused ``node``, or None with a note."""
    where = f"{spec.kind} {node.name or '?'}"
    num_heads, num_kv = spec.read_heads(node)
    if "weights" in spec.inputs:
        found = _packed_weights(node, spec, num_heads, finder.notes, where)
    else:
        found = _traced_inputs(finder, node, spec, num_heads, num_kv, where)
    if found is None:
        return None
    if found.head_size <= 0 or found.num_heads <= 0:
        finder.notes.append(f"{where}: cannot determine head geometry")
        return None
    att = _record(node, spec, found, find_output_projection(spec.output(node, "output"), finder.index))
    projections = [p for p in (found.q, found.k, found.v) if p is not None and p.node is not node]
    nodes = finder.core(projections, att.o, node) if projections else [node]
    finder.finish(att, nodes if node in nodes else [*nodes, node])
    return att


def _packed_weights(node: ir.Node, spec: FusedAttentionSpec, num_heads: int, notes: list[str],
                    where: str) -> _Projected | None:
    """com.microsoft.Attention: the node itself projects its input with packed QKV weights."""
    weights = spec.input(node, "weights")
    shape = tensor_shape(weights)
    if shape is None or len(shape) != 2:
        notes.append(f"{where}: packed weights are not a constant matrix")
        return None
    qkv = Linear(node=node, weight=weights, bias=spec.input(node, "bias"), bias_node=None, d_in=shape[0],
                 d_out=shape[1], transposed=False, input=spec.input(node, "input"), output=node.outputs[0])
    sizes = node.attributes.get_ints(spec.qkv_sizes) if spec.qkv_sizes else None
    q_size, k_size = (int(sizes[0]), int(sizes[1])) if sizes else (shape[1] // 3, shape[1] // 3)
    head_size = q_size // max(num_heads, 1)
    return _Projected(qkv=qkv, num_heads=num_heads, num_kv_heads=k_size // max(head_size, 1),
                      head_size=head_size, rotary=_rotary_attribute(node, spec))


def _traced_inputs(finder: AttentionFinder, node: ir.Node, spec: FusedAttentionSpec, num_heads: int,
                   num_kv: int, where: str) -> _Projected | None:
    """Projections traced up from the query / key / value inputs."""
    query, key, value = (spec.input(node, role) for role in ("query", "key", "value"))
    q_trace = trace_up(query, finder.index)
    q = q_trace.linear
    rotary = _rotary_attribute(node, spec) or (q is not None and is_rotary(q_trace, q))
    if key is None:  # packed QKV in the query input
        if q is None:
            finder.notes.append(f"{where}: packed QKV input without a constant-weight projection")
            return None
        return _packed(q, num_heads, num_kv, rotary)
    k_trace, v_trace = trace_up(key, finder.index), trace_up(value, finder.index)
    k, v = k_trace.linear, v_trace.linear
    if q is None or k is None or v is None:
        finder.notes.append(f"{where}: fused attention without constant-weight Q/K/V projections")
        return None
    if q is k:
        return _packed(q, num_heads, num_kv, rotary)
    if not num_heads:  # 4-D inputs: heads from the head split before the node
        heads_r, d_r = reshape_heads(path_nodes(q_trace, q), q.d_out)
        d = d_r or static_last_dim(query)
        num_heads = heads_r or (q.d_out // d if d and q.d_out % d == 0 else 0)
    if not num_heads:
        finder.notes.append(f"{where}: no head count attribute or head-split Reshape")
        return None
    head_size = q.d_out // num_heads
    return _Projected(q=q, k=k, v=v, num_heads=num_heads, num_kv_heads=num_kv or k.d_out // head_size,
                      head_size=head_size, rotary=rotary, past_key=first_past(k_trace),
                      past_value=first_past(v_trace))


def _packed(qkv: Linear, num_heads: int, num_kv: int, rotary: bool) -> _Projected:
    num_kv = num_kv or num_heads
    head_size = qkv.d_out // max(num_heads + 2 * num_kv, 1)
    return _Projected(qkv=qkv, num_heads=num_heads, num_kv_heads=num_kv, head_size=head_size, rotary=rotary)


def _rotary_attribute(node: ir.Node, spec: FusedAttentionSpec) -> bool:
    return bool(spec.rotary and node.attributes.get_int(spec.rotary, 0))


def _record(node: ir.Node, spec: FusedAttentionSpec, found: _Projected, o: Linear | None) -> Attention:
    scale = spec.read_scale(node)
    mask = spec.mask(node)
    if mask is not None and not mask.is_graph_input() and is_constant(mask):
        mask = None
    past_key = spec.input(node, "past_key") or found.past_key
    past_value = spec.input(node, "past_value") or found.past_value
    present_key, present_value = spec.output(node, "present_key"), spec.output(node, "present_value")
    if present_key is not None and not present_key.is_graph_output():
        present_key = None
    if present_value is not None and not present_value.is_graph_output():
        present_value = None
    return Attention(
        layer=-1,
        kind=spec.kind,
        q=found.q,
        k=found.k,
        v=found.v,
        qkv=found.qkv,
        o=o,
        num_heads=found.num_heads,
        num_kv_heads=found.num_kv_heads or found.num_heads,
        head_size=found.head_size,
        scale=scale or 1.0 / math.sqrt(found.head_size),
        causal=spec.read_causal(node) or (mask is not None and mask_is_causal(mask)),
        mask=mask,
        rotary=found.rotary,
        fused_node=node,
        past_key=past_key if past_key is not None and past_key.is_graph_input() else None,
        past_value=past_value if past_value is not None and past_value.is_graph_input() else None,
        present_key=present_key,
        present_value=present_value,
        scale_source="attribute" if scale else "default",
        qkv_layout="blocks" if found.qkv is not None else None,
    )
