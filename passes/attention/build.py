"""Build the fused attention node for one :class:`~onnxpress.passes.attention.match.Site` and wire it in.

Three targets, one wiring:

* ``onnxpress``   -> ``onnxpress.Attention`` (key-padding mask + causal flag + window);
* ``onnxruntime`` -> ``com.microsoft.GroupQueryAttention`` for causal cores (GQA or not),
  ``com.microsoft.MultiHeadAttention`` for the others;
* ``onnx``        -> ONNX ``Attention`` (opset 23).

All take packed ``[B, S, H*D]`` Q/K/V and return ``[B, S, H*D]`` plus BNSH present
key/value, so Q/K/V are brought to that layout (Transpose + Reshape only where the
walk stopped in another layout) and the output replaces the head-merged value.
The ORT and ONNX ops receive the model's own additive mask (padding, causal, and
whatever else the exporter folded in) as their bias, which keeps them exact for any
mask, except where the mask is a padding mask built from a 2-D graph input plus causality:
GroupQueryAttention, causal itself, then gets a bias built from that input alone (a few nodes
per step instead of the exported 4-D mask arithmetic) and its sequence lengths from that input's
length (not the cache's, so past and present may share a buffer), and ``onnxpress.Attention``, which
has no bias input, only takes such cores. Input positions and
attribute names come from the fused-op table (:mod:`onnxpress.analysis.attention.fused_ops`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.tape import Tape

from onnxpress.analysis import MaskTerm, OperandPath
from onnxpress.analysis.attention.fused_ops import (
    GROUP_QUERY_ATTENTION,
    MULTI_HEAD_ATTENTION,
    ONNX_ATTENTION,
    ONNXPRESS_ATTENTION,
    FusedAttentionSpec,
)
from onnxpress.analysis.graph_utils import float_type
from onnxpress.analysis.structures import PACKED
from onnxpress.editing import add_initializer
from onnxpress.passes.attention.match import Site


class AttentionTape(Tape):
    """A tape that names its nodes and their outputs under ``prefix`` (so the substituted
    graph reads layer by layer), and makes each small constant once per graph."""

    def __init__(self, graph: ir.Graph, prefix: str, shared: dict | None = None):
        super().__init__()
        self.graph = graph
        self.prefix = prefix
        self.shared = {} if shared is None else shared  # values built once per model (the expanded mask bias)

    def op(self, op_type: str, inputs, attributes=None, **kwargs) -> ir.Value:
        return self.op_multi_out(op_type, inputs, attributes, num_outputs=1, **kwargs)[0]

    def op_multi_out(self, op_type: str, inputs, attributes=None, *, name: str | None = None, **kwargs):
        name = f"{self.prefix}/{name or op_type}_{len(self.nodes)}"
        outputs = super().op_multi_out(op_type, inputs, attributes, name=name, **kwargs)
        for i, out in enumerate(outputs):
            out.name = f"{name}_out{i}"
        return outputs

    def constant(self, name: str, array: np.ndarray) -> ir.Value:
        """The graph's initializer ``name``, made from ``array`` on first use."""
        if name in self.graph.initializers:
            return self.graph.initializers[name]
        return add_initializer(self.graph, name, array)


def packed(tape: AttentionTape, path: OperandPath, width: int) -> ir.Value:
    """``path``'s tensor as [B, S, width] (width = heads * head_size)."""
    if path.axes == PACKED:
        return path.value
    value = path.value
    perm = [path.axes.index(c) for c in "BSHD"]
    if perm != [0, 1, 2, 3]:
        value = tape.op("Transpose", [value], {"perm": perm})
    # the width is spelled out (not -1) so shape inference knows the fused op's output width
    shape = tape.constant(f"onnxpress_attn_merge_{width}", np.array([0, 0, width], np.int64))
    return tape.op("Reshape", [value, shape])


def packed_qkv(tape: AttentionTape, site: Site) -> tuple[ir.Value, ir.Value, ir.Value]:
    att = site.att
    return packed(tape, site.q, att.q_out), packed(tape, site.k, att.kv_out), packed(tape, site.v, att.kv_out)


def mask_bias(tape: AttentionTape, terms: list[MaskTerm], query: ir.Value) -> ir.Value | None:
    """The sum of the mask terms as one additive float bias (as the original adds it),
    expanded to [B, 1, S_q, S_total]. Built once for all layers."""
    if not terms:
        return None
    key = tuple(id(t.value) for t in terms)
    if key in tape.shared:
        return tape.shared[key]
    total = None
    dtype = np.dtype((query.dtype or ir.DataType.FLOAT).numpy())  # the bias is added to scores of this type
    for term in terms:
        value = term.value
        if term.condition:
            # a float32 fill (-3.4e38) would be -inf in float16, and a row of -inf softmaxes to NaN
            fill_value = max(term.fill, float(np.finfo(dtype).min)) if np.isfinite(term.fill) else term.fill
            zero = tape.constant(f"onnxpress_attn_zero_{dtype}", np.array(0.0, dtype))
            fill = tape.constant(f"onnxpress_attn_fill_{fill_value:g}_{dtype}".replace("-", "m"),
                                 np.array(fill_value, dtype))
            value = tape.op("Where", [value, zero, fill])
        total = value if total is None else tape.op("Add", [total, value])
    tape.shared[key] = _along_queries(tape, total, query)
    return tape.shared[key]


def padding_bias(tape: AttentionTape, mask: ir.Value, query: ir.Value, dtype: ir.DataType | None) -> ir.Value:
    """The additive bias of a 2-D key-padding ``mask`` alone, [B, 1, S_q, S_total]: 0 where it
    is set, the scores type's lowest value where not. For an op that applies causality itself
    (GroupQueryAttention), this stands in for an exporter's 4-D causal-and-padding mask: a few
    nodes run per step where the exported mask arithmetic runs dozens. Built once for all layers;
    ``dtype``: the scores' (the query operand's) type."""
    key = ("padding", id(mask))
    if key in tape.shared:
        return tape.shared[key]
    dtype = np.dtype((dtype or ir.DataType.FLOAT).numpy())
    keep = tape.op("Cast", [mask], {"to": ir.DataType.BOOL})
    keep = tape.op("Unsqueeze", [keep, tape.constant("onnxpress_attn_axes_1_2", np.array([1, 2], np.int64))])
    zero = tape.constant(f"onnxpress_attn_zero_{dtype}", np.array(0.0, dtype))
    lowest = np.finfo(dtype).min
    fill = tape.constant(f"onnxpress_attn_fill_{lowest:g}_{dtype}".replace("-", "m"), np.array(lowest, dtype))
    tape.shared[key] = _along_queries(tape, tape.op("Where", [keep, zero, fill]), query)
    return tape.shared[key]


def _along_queries(tape: AttentionTape, bias: ir.Value, query: ir.Value) -> ir.Value:
    """``bias`` expanded to [B, 1, S_q, S_total]: exporters build [B, 1, 1, S] padding masks,
    and the ORT kernels want the query axis spelled out."""
    ones = tape.constant("onnxpress_attn_ones2", np.array([1, 1], np.int64))
    one = tape.constant("onnxpress_attn_one", np.array([1], np.int64))
    s_q = tape.op("Shape", [query], {"start": 1, "end": 2})
    return tape.op("Expand", [bias, tape.op("Concat", [ones, s_q, one], {"axis": 0})])


def sequence_lengths(tape: AttentionTape, query: ir.Value, past: ir.Value | None,
                     mask: ir.Value | None = None) -> tuple[ir.Value, ir.Value]:
    """GroupQueryAttention's (seqlens_k [B] int32, total_sequence_length scalar int32):
    every row valid up to past + new (padding, if any, is in the bias). With a 2-D padding
    ``mask`` (past + new long), its length, built once for all layers: the cache's own length
    then never enters, so past and present may share one buffer as long as the context
    (onnxruntime-genai's ``past_present_share_buffer``)."""
    key = ("lengths", id(mask))
    if mask is not None and key in tape.shared:
        return tape.shared[key]
    one = tape.constant("onnxpress_attn_one", np.array([1], np.int64))
    if mask is not None:
        total = tape.op("Shape", [mask], {"start": 1, "end": 2})
        batch = tape.op("Shape", [mask], {"start": 0, "end": 1})
    else:
        total = tape.op("Shape", [query], {"start": 1, "end": 2})
        if past is not None:
            total = tape.op("Add", [tape.op("Shape", [past], {"start": 2, "end": 3}), total])
        batch = tape.op("Shape", [query], {"start": 0, "end": 1})
    last = tape.op("Expand", [tape.op("Sub", [total, one]), batch])
    seqlens = tape.op("Cast", [last], {"to": ir.DataType.INT32})
    scalar = tape.op("Cast", [tape.op("Squeeze", [total])], {"to": ir.DataType.INT32})
    if mask is not None:
        tape.shared[key] = seqlens, scalar
    return seqlens, scalar


def padding_mask(site: Site) -> tuple[ir.Value | None, str | None]:
    """(2-D key-padding mask input, None) when the mask terms are padding (+causal) only,
    else (None, why not)."""
    sources = {id(t.padding_source): t.padding_source for t in site.terms if t.padding_source is not None}
    if any(not t.pure for t in site.terms):
        return None, "its mask is not a plain padding/causal mask (a bias table or extra input)"
    if len(sources) > 1:
        return None, "its mask combines several 2-D inputs"
    if site.terms and not sources and not site.att.causal:
        return None, "its mask is built from no attention_mask input and is not causal"
    return (next(iter(sources.values())) if sources else None), None


# GroupQueryAttention in ORT (1.31) rejects several new tokens after a KV cache unless batch is 1
GQA_CHUNK_LIMIT = ("com.microsoft.GroupQueryAttention cannot take several new tokens after a KV cache at "
                   "batch > 1 (ORT's limit)")


def build_fused(tape: AttentionTape, site: Site, target: str, window: int,
                chunked_decoding: bool = False) -> tuple[ir.Node, FusedAttentionSpec] | str:
    """Record the fused node for ``site`` on ``tape``; returns (node, its spec) or why it does not
    apply. ``chunked_decoding``: the model will run several new tokens after a KV cache at batch > 1,
    which rules GroupQueryAttention out for cached layers (MultiHeadAttention with the model's
    own mask as bias stands in where the heads allow)."""
    if target == "onnxpress":
        return _onnxpress(tape, site, window)
    if target == "onnxruntime":
        return _onnxruntime(tape, site, chunked_decoding)
    if target == "onnx":
        return _onnx(tape, site)
    raise ValueError(f"unknown target {target!r}")


def _onnxpress(tape: AttentionTape, site: Site, window: int) -> tuple[ir.Node, FusedAttentionSpec] | str:
    att, spec = site.att, ONNXPRESS_ATTENTION
    mask, why = padding_mask(site)
    if why:
        return f"{spec.kind} cannot express {why}"
    q, k, v = packed_qkv(tape, site)
    ins = spec.input_list(query=q, key=k, value=v, key_padding_mask=mask, past_key=site.past_key,
                          past_value=site.past_value)
    attrs = spec.attributes(num_heads=att.num_heads, kv_num_heads=att.num_kv_heads, scale=site.scale,
                            causal=att.causal, window=window)
    return _fused_node(tape, spec, site, ins, attrs)


def _onnxruntime(tape: AttentionTape, site: Site,
                 chunked_decoding: bool) -> tuple[ir.Node, FusedAttentionSpec] | str:
    att = site.att
    h, hkv = att.num_heads, att.num_kv_heads
    gqa_ruled_out = chunked_decoding and site.past_key is not None
    if gqa_ruled_out and (hkv != h or not site.terms):
        why = "grouped-query heads" if hkv != h else "no mask term to pass as its bias"
        return (f"{GQA_CHUNK_LIMIT} and MultiHeadAttention cannot stand in ({why}); "
                "use target onnxpress or onnx")
    q, k, v = packed_qkv(tape, site)
    past = {"past_key": site.past_key, "past_value": site.past_value}
    if att.causal and not gqa_ruled_out:
        spec = GROUP_QUERY_ATTENTION
        mask, why = padding_mask(site)
        # causality is GroupQueryAttention's own: a padding mask goes in as the bias alone, any
        # other mask whole
        if why:
            bias = mask_bias(tape, site.terms, q)
        else:
            bias = None if mask is None else padding_bias(tape, mask, q, float_type(site.q.value))
        seqlens, total = sequence_lengths(tape, q, site.past_key, None if why else mask)
        ins = spec.input_list(query=q, key=k, value=v, **past, seqlens_k=seqlens, total_sequence_length=total,
                              attention_bias=bias)
        attrs = spec.attributes(num_heads=h, kv_num_heads=hkv, scale=site.scale)
        return _fused_node(tape, spec, site, ins, attrs)
    if hkv != h:
        return "MultiHeadAttention needs as many KV heads as query heads (non-causal grouped-query core)"
    spec = MULTI_HEAD_ATTENTION
    ins = spec.input_list(query=q, key=k, value=v, attention_bias=mask_bias(tape, site.terms, q), **past)
    return _fused_node(tape, spec, site, ins, spec.attributes(num_heads=h, scale=site.scale))


def _onnx(tape: AttentionTape, site: Site) -> tuple[ir.Node, FusedAttentionSpec]:
    att, spec = site.att, ONNX_ATTENTION
    q, k, v = packed_qkv(tape, site)
    mask, why = padding_mask(site)
    causal_only = att.causal and not why and mask is None
    bias = None if causal_only else mask_bias(tape, site.terms, q)
    ins = spec.input_list(query=q, key=k, value=v, attention_bias=bias, past_key=site.past_key,
                          past_value=site.past_value)
    attrs = spec.attributes(num_heads=att.num_heads, kv_num_heads=att.num_kv_heads, scale=site.scale,
                            causal=causal_only)
    return _fused_node(tape, spec, site, ins, attrs)


def _fused_node(tape: AttentionTape, spec: FusedAttentionSpec, site: Site, inputs: list,
                attributes: dict) -> tuple[ir.Node, FusedAttentionSpec]:
    """The fused node, with the present key/value outputs when the core has a KV cache."""
    num_outputs = 3 if site.k.present is not None else 1
    outputs = tape.op_multi_out(spec.op_type, inputs, attributes, domain=spec.domain, num_outputs=num_outputs,
                                name=spec.op_type)
    return outputs[0].producer(), spec


def wire(graph: ir.Graph, tape: AttentionTape, site: Site, fused: ir.Node) -> None:
    """Insert the recorded nodes after the context MatMul and route the consumers of the
    original core's output (and the KV-cache graph outputs) to the fused node."""
    att = site.att
    out = fused.outputs[0]
    target = site.merged
    if target is None:  # no recognisable head merge: give the consumers [B, H, S, D] back
        shape = tape.constant(f"onnxpress_attn_split_{att.num_heads}x{att.head_size}",
                              np.array([0, 0, att.num_heads, att.head_size], np.int64))
        out = tape.op("Transpose", [tape.op("Reshape", [out, shape])], {"perm": [0, 2, 1, 3]})
        target = site.context_out
    graph.insert_after(site.anchor, tape.nodes)
    if out.dtype is None and target.dtype is not None:  # what the passes after read the activations' type from
        out.dtype = target.dtype
    _take_over(graph, target, out, uses=True)
    if site.k.present is not None:
        # only the graph outputs: nodes still reading the old cache Concat (a mask sized from
        # it) sit upstream of the fused node; redirecting them would make a cycle
        _take_over(graph, site.k.present, fused.outputs[1], uses=False)
        _take_over(graph, site.v.present, fused.outputs[2], uses=False)


def _take_over(graph: ir.Graph, old: ir.Value, new: ir.Value, *, uses: bool) -> None:
    """Make ``new`` stand in for ``old``: its uses (if ``uses``), and its graph-output slot
    and name (so present.* outputs keep their names)."""
    if uses:
        for use in list(old.uses()):
            use.node.replace_input_with(use.idx, new)
    if old.is_graph_output():
        name = old.name
        old.name = f"{name}_unfused"
        for i, value in enumerate(graph.outputs):
            if value is old:
                graph.outputs[i] = new
        new.name = name
        new.shape, new.dtype = old.shape, old.dtype


def replace_shape_reads(graph: ir.Graph, sites: list[Site]) -> int:
    """Give live ``Shape`` reads of the removed core a cheap equivalent.

    Exporters size the mask from the attention operands (HF SDPA slices the mask to
    ``key.shape[-2]`` of the *repeated* keys), so a Shape of a core value can stay
    live after fusion and keep the repeat-KV Expand running just to be measured. The
    walk knows each crossed value's axes, so its shape is rebuilt from the operands
    the fused node reads anyway: batch and lengths from Shape of those, heads and
    head size as constants. Returns how many Shape nodes were replaced."""
    replaced = 0
    for site in sites:
        for path in (site.q, site.k, site.v):
            for value, axes, heads, with_past in path.trail:
                if value is path.value or len(axes) != 4:
                    continue
                for shape_node in [u.node for u in value.uses() if u.node.op_type == "Shape"]:
                    if shape_node.graph is not graph:
                        continue
                    tape = AttentionTape(graph, f"{shape_node.name}_surrogate")
                    dims = _dims(tape, path, axes, heads, site.att.head_size, with_past, site.past_key)
                    start = shape_node.attributes.get_int("start", 0)
                    end = shape_node.attributes.get_int("end", 4)
                    picked = dims[slice(start, end)]
                    out = tape.op("Concat", picked, {"axis": 0}) if len(picked) != 1 else picked[0]
                    graph.insert_before(shape_node, tape.nodes)
                    ir.convenience.replace_all_uses_with(shape_node.outputs[0], out)
                    replaced += 1
    return replaced


def _dims(tape: AttentionTape, path: OperandPath, axes: str, heads: int, head_size: int, with_past: bool,
          past: ir.Value | None) -> list[ir.Value]:
    """One int64[1] value per axis of a value labelled ``axes`` on ``path``'s walk."""
    src_axes = "BS" if path.axes == PACKED else path.axes

    def dim_of(label: str) -> ir.Value:
        i = src_axes.index(label)
        return tape.op("Shape", [path.value], {"start": i, "end": i + 1})

    out = []
    for label in axes:
        if label == "B":
            out.append(dim_of("B"))
        elif label == "S":
            length = dim_of("S")
            if with_past and past is not None:
                length = tape.op("Add", [tape.op("Shape", [past], {"start": 2, "end": 3}), length])
            out.append(length)
        elif label == "H":
            out.append(tape.constant(f"onnxpress_attn_dim_{heads}", np.array([heads], np.int64)))
        else:
            out.append(tape.constant(f"onnxpress_attn_dim_{head_size}", np.array([head_size], np.int64)))
    return out
