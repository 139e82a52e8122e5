"""Build the fused attention node for one :class:`~attention_match.Site` and wire it in.

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
mask; ``onnxpress.Attention`` has no bias input, so it only takes cores whose mask
is a padding mask built from a 2-D graph input, plus causality.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxpress.passes.attention.match import PACKED, MaskTerm, Operand, Site


@dataclass
class Builder:
    """Creates nodes for one site; collects them so they are inserted in order."""

    graph: ir.Graph
    prefix: str
    nodes: list[ir.Node] = field(default_factory=list)
    shared: dict = field(default_factory=dict)  # values built once per model (the expanded mask bias)

    def op(self, op_type: str, inputs, attributes=None, *, domain: str = "", num_outputs: int = 1, name=None):
        inputs = list(inputs)
        while inputs and inputs[-1] is None:  # optional inputs: omit trailing empty slots
            inputs.pop()
        node = ir.node(op_type, inputs, attributes or {}, domain=domain, num_outputs=num_outputs,
                       name=f"{self.prefix}/{name or op_type}_{len(self.nodes)}")
        for i, out in enumerate(node.outputs):
            out.name = f"{node.name}_out{i}"
        self.nodes.append(node)
        return node.outputs[0] if num_outputs == 1 else node.outputs

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        """A shared small initializer (created once per graph)."""
        if name in self.graph.initializers:
            return self.graph.initializers[name]
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        value.shape, value.dtype = ir.Shape(array.shape), value.const_value.dtype
        self.graph.register_initializer(value)
        return value

    def packed(self, operand: Operand, width: int) -> ir.Value:
        """``operand`` as [B, S, width] (width = heads * head_size)."""
        if operand.axes == PACKED:
            return operand.value
        value = operand.value
        perm = [operand.axes.index(c) for c in "BSHD"]
        if perm != [0, 1, 2, 3]:
            value = self.op("Transpose", [value], {"perm": perm})
        # the width is spelled out (not -1) so shape inference knows the fused op's output width
        shape = self.const(f"onnxpress_attn_merge_{width}", np.array([0, 0, width], np.int64))
        return self.op("Reshape", [value, shape])

    def qkv(self, site: Site) -> tuple[ir.Value, ir.Value, ir.Value]:
        att = site.att
        return (self.packed(site.q, att.num_heads * att.head_size), self.packed(site.k, att.kv_out),
                self.packed(site.v, att.kv_out))

    def bias(self, terms: list[MaskTerm], query: ir.Value) -> ir.Value | None:
        """The sum of the mask terms as one additive float bias (as the original adds it),
        expanded to [B, 1, S_q, S_total]: exporters build [B, 1, 1, S] padding masks, and
        the ORT kernels want the query axis spelled out. Built once for all layers."""
        if not terms:
            return None
        key = tuple(id(t.value) for t in terms)
        if key in self.shared:
            return self.shared[key]
        total = None
        for term in terms:
            value = term.value
            if term.condition:
                zero = self.const("onnxpress_attn_zero", np.array(0.0, np.float32))
                fill = self.const(f"onnxpress_attn_fill_{term.fill:g}".replace("-", "m"),
                                  np.array(term.fill, np.float32))
                value = self.op("Where", [value, zero, fill])
            total = value if total is None else self.op("Add", [total, value])
        ones = self.const("onnxpress_attn_ones2", np.array([1, 1], np.int64))
        one = self.const("onnxpress_attn_one", np.array([1], np.int64))
        s_q = self.op("Shape", [query], {"start": 1, "end": 2})
        total = self.op("Expand", [total, self.op("Concat", [ones, s_q, one], {"axis": 0})])
        self.shared[key] = total
        return total

    def sequence_lengths(self, query: ir.Value, past: ir.Value | None) -> tuple[ir.Value, ir.Value]:
        """GroupQueryAttention's (seqlens_k [B] int32, total_sequence_length scalar int32):
        every row valid up to past + new (padding, if any, is in the bias)."""
        s_new = self.op("Shape", [query], {"start": 1, "end": 2})
        total = s_new
        if past is not None:
            total = self.op("Add", [self.op("Shape", [past], {"start": 2, "end": 3}), s_new])
        one = self.const("onnxpress_attn_one", np.array([1], np.int64))
        batch = self.op("Shape", [query], {"start": 0, "end": 1})
        seqlens = self.op("Cast", [self.op("Expand", [self.op("Sub", [total, one]), batch])],
                          {"to": ir.DataType.INT32})
        scalar = self.op("Cast", [self.op("Squeeze", [total])], {"to": ir.DataType.INT32})
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


def build_fused(b: Builder, site: Site, target: str, window: int,
                chunked_decoding: bool = False) -> tuple[ir.Node, str] | str:
    """Create the fused node for ``site``; returns (node, op name) or why it does not apply.
    ``chunked_decoding``: the model will run several new tokens after a KV cache at batch > 1,
    which rules GroupQueryAttention out for cached layers (MultiHeadAttention with the model's
    own mask as bias stands in where the heads allow)."""
    att = site.att
    h, hkv = att.num_heads, att.num_kv_heads
    n_out = 3 if site.k.present is not None else 1
    past_k, past_v = site.past_key, site.past_value
    if target == "onnxpress":
        mask, why = padding_mask(site)
        if why:
            return f"onnxpress.Attention cannot express {why}"
        q, k, v = b.qkv(site)
        attrs = {"num_heads": h, "kv_num_heads": hkv, "scale": site.scale, "causal": int(att.causal)}
        if window:
            attrs["window"] = window
        outs = b.op("Attention", [q, k, v, mask, past_k, past_v], attrs, domain="onnxpress", num_outputs=n_out)
        return _node(outs), "onnxpress.Attention"
    if target == "onnxruntime":
        gqa_ruled_out = chunked_decoding and past_k is not None
        if gqa_ruled_out and (hkv != h or not site.terms):
            why = "grouped-query heads" if hkv != h else "no mask term to pass as its bias"
            return f"{GQA_CHUNK_LIMIT} and MultiHeadAttention cannot stand in ({why}); use target onnxpress or onnx"
        q, k, v = b.qkv(site)
        if att.causal and not gqa_ruled_out:
            _, why = padding_mask(site)
            # a pure causal mask is GroupQueryAttention's own; anything else goes in as the bias
            bias = b.bias(site.terms, q) if why or any(t.padding_source is not None for t in site.terms) else None
            seqlens, total = b.sequence_lengths(q, past_k)
            attrs = {"num_heads": h, "kv_num_heads": hkv, "scale": site.scale}
            ins = [q, k, v, past_k, past_v, seqlens, total, None, None, None, bias]
            outs = b.op("GroupQueryAttention", ins, attrs, domain="com.microsoft", num_outputs=n_out)
            return _node(outs), "com.microsoft.GroupQueryAttention"
        if hkv != h:
            return "MultiHeadAttention needs as many KV heads as query heads (non-causal grouped-query core)"
        ins = [q, k, v, None, None, b.bias(site.terms, q), past_k, past_v]
        outs = b.op("MultiHeadAttention", ins, {"num_heads": h, "scale": site.scale}, domain="com.microsoft",
                    num_outputs=n_out)
        return _node(outs), "com.microsoft.MultiHeadAttention"
    if target == "onnx":
        q, k, v = b.qkv(site)
        mask, why = padding_mask(site)
        causal_only = att.causal and not why and mask is None
        attrs = {"q_num_heads": h, "kv_num_heads": hkv, "scale": site.scale, "is_causal": int(causal_only)}
        ins = [q, k, v, None if causal_only else b.bias(site.terms, q), past_k, past_v]
        outs = b.op("Attention", ins, attrs, num_outputs=n_out)
        return _node(outs), "Attention"
    raise ValueError(f"unknown target {target!r}")


def _node(outs) -> ir.Node:
    return (outs if isinstance(outs, ir.Value) else outs[0]).producer()


def wire(graph: ir.Graph, b: Builder, site: Site, fused: ir.Node) -> None:
    """Insert the built nodes after the context MatMul and route the consumers of the
    original core's output (and the KV-cache graph outputs) to the fused node."""
    att = site.att
    out = fused.outputs[0]
    target = site.merged
    if target is None:  # no recognisable head merge: give the consumers [B, H, S, D] back
        shape = b.const(f"onnxpress_attn_split_{att.num_heads}x{att.head_size}",
                        np.array([0, 0, att.num_heads, att.head_size], np.int64))
        out = b.op("Transpose", [b.op("Reshape", [out, shape])], {"perm": [0, 2, 1, 3]})
        target = site.context_out
    graph.insert_after(site.anchor, b.nodes)
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
        for operand in (site.q, site.k, site.v):
            stop = operand.value
            for value, axes, heads, with_past in operand.trail:
                if value is stop or len(axes) != 4:
                    continue
                for node in [n for n in value.uses() if n.node.op_type == "Shape"]:
                    shape_node = node.node
                    if shape_node.graph is not graph:
                        continue
                    b = Builder(graph, f"{shape_node.name}_surrogate")
                    dims = _dims(b, operand, axes, heads, site.att.head_size, with_past, site.past_key)
                    start = int(shape_node.attributes["start"].value) if "start" in shape_node.attributes else 0
                    end = int(shape_node.attributes["end"].value) if "end" in shape_node.attributes else 4
                    picked = dims[slice(start, end)]
                    out = b.op("Concat", picked, {"axis": 0}) if len(picked) != 1 else picked[0]
                    graph.insert_before(shape_node, b.nodes)
                    ir.convenience.replace_all_uses_with(shape_node.outputs[0], out)
                    replaced += 1
    return replaced


def _dims(b: Builder, operand: Operand, axes: str, heads: int, head_size: int, with_past: bool,
          past: ir.Value | None) -> list[ir.Value]:
    """One int64[1] value per axis of a value labelled ``axes`` on ``operand``'s walk."""
    src_axes = "BS" if operand.axes == PACKED else operand.axes

    def dim_of(label: str) -> ir.Value:
        i = src_axes.index(label)
        return b.op("Shape", [operand.value], {"start": i, "end": i + 1})

    out = []
    for label in axes:
        if label == "B":
            out.append(dim_of("B"))
        elif label == "S":
            length = dim_of("S")
            if with_past and past is not None:
                length = b.op("Add", [b.op("Shape", [past], {"start": 2, "end": 3}), length])
            out.append(length)
        elif label == "H":
            out.append(b.const(f"onnxpress_attn_dim_{heads}", np.array([heads], np.int64)))
        else:
            out.append(b.const(f"onnxpress_attn_dim_{head_size}", np.array([head_size], np.int64)))
    return out
