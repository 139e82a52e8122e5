"""``analyze(model) -> TransformerMap``: put attention, FFN and norms into layers.

Attention blocks are ordered by their position in the (topologically sorted)
graph; block *i* is layer *i*. FFNs and norms are placed by dataflow, not by node
order, so parallel-residual blocks (Phi, GPT-NeoX: attention and FFN read the same
input) and post-norm blocks (BERT: the norm follows the residual add) land in the
right layer:

* an FFN whose input depends on attention blocks ``0..k-1`` belongs to layer ``k-1``
  when attention ``k`` depends on the FFN (sequential block), else to layer ``k``
  (it runs alongside attention ``k``);
* in post-norm models (the residual sum after the output projection feeds only a
  norm) a norm belongs to the latest block it depends on; in pre-norm models to
  the block it feeds.

Pure inspection: the model is never modified.
"""

from __future__ import annotations

from collections import deque

import onnx_ir as ir

from onnxpress.analysis.attention import AttentionFinder
from onnxpress.analysis.cost import attention_macs, count_params
from onnxpress.analysis.ffn import find_ffns
from onnxpress.analysis.graph_utils import (
    LAYOUT_OPS,
    consumers,
    data_consumers,
    decode_body,
    is_constant,
    is_scalar_scale,
    memoized,
    numel,
    tensor_shape,
)
from onnxpress.analysis.linear import LinearIndex
from onnxpress.analysis.norms import Norm, find_norms
from onnxpress.analysis.structures import FFN, Attention, Extra, Layer, Linear, TransformerMap


def analyze(model: ir.Model, *, seq_len: int = 128) -> TransformerMap:
    """Map the transformer layers of ``model`` (see module docstring)."""
    with memoized():
        return _analyze(model, seq_len)


def _analyze(model: ir.Model, seq_len: int) -> TransformerMap:
    graph = decode_body(model).graph
    index = LinearIndex(graph)
    order = {id(n): i for i, n in enumerate(graph)}
    finder = AttentionFinder(graph, index)
    attentions = finder.find()
    unrecognised = list(finder.notes)
    attentions.sort(key=lambda a: order.get(id(_anchor(a)), 0))
    attentions = _dedupe(attentions, unrecognised)
    for i, att in enumerate(attentions):
        att.layer = i

    attention_linears = {id(p.node) for a in attentions for p in a.projections}
    ffns, ffn_notes = find_ffns(index, attention_linears)
    unrecognised += ffn_notes
    norms = find_norms(graph)

    n = len(attentions)
    # bit i: attention i's output; bit n + j: FFN j's output
    markers: dict[int, int] = {}
    for i, att in enumerate(attentions):
        markers[id(_output_node(att))] = 1 << i
    for j, ffn in enumerate(ffns):
        markers[id(ffn.down.node)] = markers.get(id(ffn.down.node), 0) | (1 << (n + j))
    masks = _ancestor_masks(graph, markers)

    layers = [Layer(index=i, attention=att, ffn=None) for i, att in enumerate(attentions)]
    _place_ffns(ffns, attentions, layers, masks, n, unrecognised)
    _place_norms(norms, layers, attentions, ffns, masks, n, index)
    for layer in layers:
        layer.residual_adds = _residual_adds(layer)
        if layer.ffn is None and layer.attention is not None:
            unrecognised.append(f"layer {layer.index}: no feed-forward block recognised")
        layer.params = _layer_params(layer, norms)
        layer.macs = sum(lin.d_in * lin.d_out for lin in layer.linears)
        if layer.attention is not None:
            layer.macs += attention_macs(layer.attention.num_heads, layer.attention.head_size, seq_len)

    in_layers = {id(lin.node) for layer in layers for lin in layer.linears}
    extras = _extras(graph, index, in_layers, masks, n, unrecognised)

    kv_in = [v for a in attentions for v in (a.past_key, a.past_value) if v is not None]
    kv_out = [v for a in attentions for v in (a.present_key, a.present_value) if v is not None]
    unmatched_past = [v for v in graph.inputs if _looks_like_past(v) and v not in kv_in]
    if unmatched_past:
        unrecognised.append(
            f"{len(unmatched_past)} KV-cache-like inputs feed no recognised attention: "
            + ", ".join(v.name or "?" for v in unmatched_past[:4])
        )
    causal = any(a.causal for a in attentions)
    kind = "decoder" if causal else "vision" if _is_vision(graph) else "encoder"
    tmap = TransformerMap(
        layers=layers,
        kind=kind,
        causal=causal,
        kv_cache_inputs=kv_in,
        kv_cache_outputs=kv_out,
        unrecognised=unrecognised,
        params=count_params(model),
        macs=0,
        extras=extras,
        seq_len=seq_len,
    )
    from onnxpress.analysis.cost import linear_macs

    tmap.macs = linear_macs(model) + sum(
        attention_macs(a.num_heads, a.head_size, seq_len) for a in attentions
    )
    if not attentions:
        unrecognised.append("no attention block recognised in the graph")
    return tmap


# ------------------------------------------------------------------ ordering


def _anchor(att: Attention) -> ir.Node:
    return att.fused_node or att.scores_matmul or att.softmax


def _output_node(att: Attention) -> ir.Node:
    if att.o is not None:
        return att.o.node
    return att.fused_node or att.context_matmul


def _dedupe(attentions: list[Attention], notes: list[str]) -> list[Attention]:
    """Two anchors claiming the same projections (should not happen) keep the first."""
    out, seen = [], set()
    for att in attentions:
        key = tuple(id(p.node) for p in att.projections if p is not att.o)
        if key in seen:
            notes.append(
                f"attention at {_anchor(att).name or '?'} repeats another block's projections; skipped"
            )
            continue
        seen.add(key)
        out.append(att)
    return out


def _ancestor_masks(graph: ir.Graph, markers: dict[int, int]) -> dict[int, int]:
    """For every node, the OR of the marker bits of itself and all its ancestors."""
    masks: dict[int, int] = {}
    for node in graph:
        m = markers.get(id(node), 0)
        for v in node.inputs:
            if v is None:
                continue
            p = v.producer()
            if p is not None:
                m |= masks.get(id(p), 0)
        masks[id(node)] = m
    return masks


def _high_bit(mask: int, n: int) -> int:
    """1 + index of the latest attention block in ``mask`` (0 when none)."""
    m = mask & ((1 << n) - 1)
    return m.bit_length()


def _place_ffns(
    ffns: list[FFN], attentions: list[Attention], layers: list[Layer], masks, n: int, notes
) -> None:
    for j, ffn in enumerate(ffns):
        first = ffn.gate or ffn.up
        k = _high_bit(masks.get(id(first.node), 0), n)
        if k == 0 and n:
            target = 0 if _runs_alongside(attentions[0], ffn, masks, n + j) else None
        elif k < n and masks.get(id(_input_node(attentions[k])), 0) & (1 << (n + j)):
            target = k - 1
        elif k < n:
            target = k
        else:
            target = n - 1
        if target is None or target < 0 or target >= len(layers):
            notes.append(f"FFN ending at {ffn.down.node.name or '?'} belongs to no attention layer")
            continue
        if layers[target].ffn is not None:
            notes.append(f"layer {target}: a second FFN ({ffn.down.node.name or '?'}) found; kept the first")
            continue
        ffn.layer = target
        layers[target].ffn = ffn


def _runs_alongside(att: Attention, ffn: FFN, masks, bit: int) -> bool:
    return not masks.get(id(_input_node(att)), 0) & (1 << bit)


def _input_node(att: Attention) -> ir.Node:
    for p in (att.q, att.qkv, att.k, att.v):
        if p is not None:
            return p.node
    return att.fused_node


def _is_post_norm(attentions: list[Attention], norm_inputs: set[int]) -> bool:
    """Post-norm (BERT): the residual sum after the output projection feeds only norms."""
    for att in attentions[:1]:
        if att.o is None:
            return False
        for c in data_consumers(att.o.output):
            if c.op_type == "Add" and all(v is not None and not is_constant(v) for v in c.inputs):
                users = data_consumers(c.outputs[0])
                return (
                    bool(users)
                    and all(id(c.outputs[0]) in norm_inputs for _ in users)
                    and all(u.op_type not in ("Add", "MatMul", "Gemm") for u in users)
                )
    return False


def _place_norms(norms: list[Norm], layers: list[Layer], attentions, ffns, masks, n: int, index) -> None:
    if not layers:
        return
    post = _is_post_norm(attentions, {id(nm.input) for nm in norms})
    linear_layer: dict[int, int] = {}
    for layer in layers:
        for lin in layer.linears:
            linear_layer[id(lin.node)] = layer.index
        if layer.attention is not None and layer.attention.fused_node is not None:
            linear_layer[id(layer.attention.fused_node)] = layer.index
    # norms inside an attention block (Qwen3's q_norm / k_norm) belong to its layer
    inside = {id(node): layer.index for layer in layers if layer.attention is not None
              for node in layer.attention.nodes}
    for norm in norms:
        if id(norm.node) in inside:
            target = inside[id(norm.node)]
        elif post or norm.skip:
            target = _latest_block(masks.get(id(norm.node), 0), n, ffns)
        else:
            target = _first_fed_layer(norm, linear_layer)
        if target is not None and 0 <= target < len(layers):
            layers[target].norms.append(norm.node)


def _latest_block(mask: int, n: int, ffns: list[FFN]) -> int | None:
    best = _high_bit(mask, n) - 1
    rest = mask >> n
    j = 0
    while rest:
        if rest & 1 and ffns[j].layer >= 0:
            best = max(best, ffns[j].layer)
        rest >>= 1
        j += 1
    return best if best >= 0 else None


def _first_fed_layer(norm: Norm, linear_layer: dict[int, int]) -> int | None:
    queue = deque([norm.output])
    seen: set[int] = set()
    while queue and len(seen) < 64:
        v = queue.popleft()
        for c in consumers(v):
            if id(c) in seen:
                continue
            seen.add(id(c))
            if id(c) in linear_layer:
                return linear_layer[id(c)]
            if c.op_type in LAYOUT_OPS:
                queue.extend(c.outputs)
    return None


def _second_factor(node: ir.Node, value: ir.Value) -> bool:
    """``value`` @ a constant weight, or + a constant bias: the B of a projection split into A @ B."""
    if node.op_type == "MatMul":
        return node.inputs[0] is value and is_constant(node.inputs[1])
    return node.op_type == "Add" and any(is_constant(v) for v in node.inputs)


def _residual_adds(layer: Layer) -> list[ir.Node]:
    """The Adds that merge this block's attention / FFN output into the residual stream."""
    starts: list[ir.Value] = []
    if layer.attention is not None:
        if layer.attention.o is not None:
            starts.append(layer.attention.o.output)
        elif layer.attention.fused_node is not None:
            starts.append(layer.attention.fused_node.outputs[0])
    if layer.ffn is not None:
        starts.append(layer.ffn.down.output)
    adds: list[ir.Node] = []
    for start in starts:
        value = start
        for _ in range(4):
            users = data_consumers(value)
            # through GPT-2's Conv1D reshapes back, a residual multiplier (Granite) and the
            # second factor of a low-rank split projection with its bias
            while len(users) == 1 and (users[0].op_type in LAYOUT_OPS or is_scalar_scale(users[0])
                                       or _second_factor(users[0], value)):
                value = users[0].outputs[0]
                users = data_consumers(value)
            add = next(
                (
                    u
                    for u in users
                    if u.op_type == "Add" and all(v is not None and not is_constant(v) for v in u.inputs)
                ),
                None,
            )
            if add is None:
                break
            if add not in adds:
                adds.append(add)
            value = add.outputs[0]
            nxt = data_consumers(value)
            if not (len(nxt) == 1 and nxt[0].op_type == "Add"):
                break
    return adds


def _layer_params(layer: Layer, norms: list[Norm]) -> int:
    total = sum(lin.params for lin in layer.linears)
    by_node = {id(nm.node): nm for nm in norms}
    for node in layer.norms:
        nm = by_node.get(id(node))
        if nm is None:
            continue
        for w in nm.weights:
            shape = tensor_shape(w)
            from_constant_node = w.producer() is not None and w.producer().op_type == "Constant"
            if shape is not None and not from_constant_node:  # as count_params: initializers only
                total += numel(shape)
    return total


# ------------------------------------------------------------------ extras


def _extras(graph: ir.Graph, index: LinearIndex, in_layers: set[int], masks, n: int, notes) -> list[Extra]:
    extras: list[Extra] = []
    outputs = {id(v) for v in graph.outputs}
    for node in graph:
        if node.op_type == "Conv" and node.inputs[1] is not None and is_constant(node.inputs[1]):
            if _high_bit(masks.get(id(node), 0), n) == 0:
                extras.append(Extra("patch_embedding", node))
            else:
                notes.append(
                    f"Conv {node.name or '?'} with constant weights inside the layers is not recognised"
                )
    for lin in index.ordered:
        if id(lin.node) in in_layers or lin.node.op_type == "Attention":
            continue
        after = _high_bit(masks.get(id(lin.node), 0), n)
        feeds_output = _reaches(lin.output, outputs)
        users = {u.op_type for u in data_consumers(lin.output)}
        if after == 0 and n:
            role = "embedding_projection"
        elif "Tanh" in users:
            role = "pooler"
        elif feeds_output and after >= n:
            role = "lm_head" if lin.d_out > lin.d_in else "classifier" if lin.d_out < 64 else "head"
        elif after >= n:
            role = "head"
        else:
            role = "linear"
            notes.append(
                f"MatMul {lin.node.name or '?'} ({lin.d_in}->{lin.d_out}) with a constant weight "
                f"belongs to no attention or FFN block (after layer {after - 1})"
            )
            continue
        extras.append(Extra(role, lin.node, lin))
    return extras


def _reaches(value: ir.Value, outputs: set[int], limit: int = 32) -> bool:
    queue = deque([value])
    seen: set[int] = set()
    while queue and len(seen) < limit:
        v = queue.popleft()
        if id(v) in outputs:
            return True
        for c in consumers(v):
            if id(c) not in seen and c.op_type in LAYOUT_OPS | {"Add", "Tanh", "Softmax", "Mul", "Div"}:
                seen.add(id(c))
                queue.extend(c.outputs)
    return False


def _looks_like_past(value: ir.Value) -> bool:
    name = (value.name or "").lower()
    return "past" in name or name.startswith("cache") or ".key" in name and "present" not in name


def _is_vision(graph: ir.Graph) -> bool:
    for v in graph.inputs:
        if v.shape is not None and len(v.shape) == 4 and v.dtype is not None and v.dtype.is_floating_point():
            return True
    return any(n.op_type == "Conv" for n in graph)


__all__ = ["analyze", "Linear"]
