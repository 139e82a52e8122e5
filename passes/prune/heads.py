"""Structured pruning of attention heads (whole KV groups under grouped-query attention).

Decision and repair are in :mod:`.scoring`; this module maps
heads to the output projection's input columns, prices them and rewrites the graph:

* Q/K/V (or packed QKV) weight columns and biases of removed heads are sliced away,
  the output projection loses the matching rows (and is refitted when ``repair``);
* head-count constants of Reshape/Expand targets and of the packed-QKV Split are
  patched, fused ops get new ``num_heads``/``kv_num_heads``/``qkv_hidden_sizes``;
* KV-cache graph inputs and outputs get their new head dimension.

Under GQA a KV head and the ``num_heads / num_kv_heads`` query heads that read it
(HF ``repeat_kv`` and ORT's GroupQueryAttention both map query head ``h`` to KV head
``h // n_rep``) are one unit: removing a lone query head would break the ratio the
kernels assume. Rotary embeddings act within a head, so they are unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from onnxpress.activations import probe_shapes
from onnxpress.analysis.attention.fused_ops import spec_for
from onnxpress.analysis.graph_utils import const_array, shape_elements, stored_array
from onnxpress.calibration import is_past_input
from onnxpress.editing import GraphEditor
from onnxpress.errors import OnnxpressError
from onnxpress.pass_infra import Outcome, Pass, register_pass
from onnxpress.passes.prune import rewrite, scoring
from onnxpress.passes.prune.config import PruneConfig

_FUSED_KINDS = ("com.microsoft.Attention", "com.microsoft.MultiHeadAttention",
                "com.microsoft.GroupQueryAttention", "Attention", "onnxpress.Attention")


@dataclass
class PruneHeadsConfig(PruneConfig):
    targets: ClassVar[tuple[str, ...]] = ("heads", "params", "macs")
    fraction: float = 0.33
    target: str = "heads"  # share of query heads, of attention parameters or of attention MACs
    min_groups_per_layer: int = 1  # KV groups (heads without GQA) every layer keeps

    def validate(self) -> None:
        super().validate()
        if self.min_groups_per_layer < 1:
            self.fail("min_groups_per_layer", "must be at least 1: removing a whole attention block is not supported")


@dataclass
class _Unit:
    """One prunable attention block and the cost of each of its KV groups."""

    layer: object  # analysis Layer
    att: object  # analysis Attention
    n_rep: int
    params_per_group: int
    macs_per_group: int

    @property
    def groups(self) -> list[np.ndarray]:
        """o-proj input columns of each KV group (its query heads' context vectors)."""
        width = self.n_rep * self.att.head_size
        return [np.arange(g * width, (g + 1) * width) for g in range(self.att.num_kv_heads)]


@register_pass
class PruneHeadsPass(Pass):
    name = "prune_heads"
    config_class = PruneHeadsConfig
    needs_attention = True
    needs_calibration = True

    def apply(self, model: ir.Model, ctx) -> Outcome:
        cfg: PruneHeadsConfig = self.config
        tmap = ctx.analysis(model)
        units, skipped = _units(tmap)
        details: dict = {"skipped": skipped, "layers": []}
        if not units:
            raise OnnxpressError(f"prune_heads: no attention block can be pruned ({'; '.join(skipped) or 'none found'})")
        # whole KV groups go: a layer left with min_groups_per_layer groups has none to give
        units, single = ([u for u in units if u.att.num_kv_heads > cfg.min_groups_per_layer],
                         [u for u in units if u.att.num_kv_heads <= cfg.min_groups_per_layer])
        skipped += [f"layer {u.layer.index}: {u.att.num_kv_heads} KV group(s), "
                    f"min_groups_per_layer {cfg.min_groups_per_layer}" for u in single]
        if cfg.fraction == 0 or not units:
            return Outcome(changes={"heads_removed": 0}, details=details)
        _check_empty_past(model, ctx)

        weights = [rewrite.read_weight(u.att.o) for u in units]
        biases = [rewrite.read_bias(u.att.o) for u in units]
        calibration = scoring.calibration_stats(model, ctx, self.name, cfg, tmap.kind, [(u.att.o, u.layer) for u in units])
        stats = calibration.fit
        if stats:
            details["calibration_tokens"] = int(calibration.final[0].gram.count)
            details["calibration_augment"] = cfg.augment if ctx.replaceable_tokens() is not None else 0.0

        curves, totals = [], []
        for i, u in enumerate(units):
            max_remove = u.att.num_kv_heads - cfg.min_groups_per_layer
            elim, scale = _eliminate(cfg, u, weights[i], biases[i], stats[i] if stats else None, max_remove)
            cost = {"heads": u.n_rep, "params": u.params_per_group, "macs": u.macs_per_group}[cfg.target]
            curves.append(scoring.LayerCurve(elim, unit_cost=float(cost), scale=scale, max_remove=max(0, max_remove)))
            totals.append(u.att.num_kv_heads)
        repairs = calibration.repairs(cfg, weights, biases, final=False)
        counts, details["allocation"], notes = scoring.allocated_counts(
            model, ctx, self.name, cfg, tmap.kind, [u.att.o for u in units], curves,
            [u.groups for u in units], repairs, totals, calibration.probes)
        if notes:
            details["notes"] = notes

        # per-head additive score biases (MPNet's relative position bias, ALiBi) must lose
        # the removed heads too; which inputs of the score Adds carry a head axis is a
        # run-time fact
        candidates = [v for u in units for _, _, v in _score_bias_inputs(u.att)
                      if not v.is_graph_input() and stored_array(v) is None]
        feeds = ctx.verification[0] if ctx.verification else ctx.calibration_batches(self.name, 1)[0]
        bias_shapes = probe_shapes(model, [v.name for v in candidates], feeds, threads=ctx.threads)

        editor = GraphEditor(model)
        final_repairs = calibration.repairs(cfg, weights, biases, final=True)
        removed_heads = removed_groups = 0
        for i, (u, curve, count) in enumerate(zip(units, curves, counts, strict=True)):
            drop = set(curve.elimination.order[:count])
            keep = [g for g in range(u.att.num_kv_heads) if g not in drop]
            layer_info = {"layer": u.att.layer, "heads": u.att.num_heads, "kv_heads": u.att.num_kv_heads,
                          "removed_kv_groups": sorted(drop),
                          "predicted_error": float(curve.path()[count - 1]) if count else 0.0}
            details["layers"].append(layer_info)
            if not drop:
                continue
            cols = np.concatenate([u.groups[g] for g in keep])
            w_o, b_o = final_repairs[i](cols)
            _rewrite(editor, u, keep, w_o, b_o, add_bias=cfg.add_bias and cfg.repair)
            _gather_score_biases(editor, u, keep, bias_shapes)
            removed_groups += len(drop)
            removed_heads += len(drop) * u.n_rep
        total_heads = sum(u.att.num_heads for u in units)
        details["removed_fraction_of_heads"] = removed_heads / total_heads if total_heads else 0.0
        return Outcome(changes={"heads_removed": removed_heads, "kv_groups_removed": removed_groups}, details=details)


def _units(tmap) -> tuple[list[_Unit], list[str]]:
    units, skipped = [], []
    for layer in tmap.layers:
        att = layer.attention
        if att is None:
            continue
        why = _unsupported(att)
        if why:
            skipped.append(f"layer {layer.index}: {why}")
            continue
        h, kv, d = att.num_heads, att.num_kv_heads, att.head_size
        n_rep = h // kv
        d_model = att.o.d_out
        d_in = (att.q or att.qkv).d_in
        q_bias = (att.q or att.qkv).bias is not None
        kv_bias = (att.k or att.qkv).bias is not None
        params = d_in * d * (n_rep + 2) + (n_rep * d if q_bias else 0) + (2 * d if kv_bias else 0) + n_rep * d * d_model
        macs = d_in * d * (n_rep + 2) + n_rep * d * d_model + 2 * tmap.seq_len * d * n_rep
        units.append(_Unit(layer, att, n_rep, params, macs))
    return units, skipped


def _unsupported(att) -> str | None:
    if att.kind != "decomposed" and att.kind not in _FUSED_KINDS:
        return f"attention kind {att.kind} is not supported"
    if att.o is None:
        return "no output projection found"
    h, kv, d = att.num_heads, att.num_kv_heads, att.head_size
    if kv <= 0 or h % kv:
        return f"{h} heads do not split into {kv} KV groups"
    if att.o.d_in != h * d:
        return f"output projection input {att.o.d_in} != {h} heads x {d}"
    if att.qkv is None and (att.q is None or att.k is None or att.v is None):
        return "Q/K/V projections not found"
    if att.qkv is not None and att.qkv_layout not in ("blocks", "interleaved"):
        return f"packed QKV layout {att.qkv_layout!r} is unknown"
    if att.qkv is None and (att.q.d_out != h * d or att.k.d_out != kv * d or att.v.d_out != kv * d):
        return "Q/K/V widths do not match the head geometry"
    return None


def _eliminate(cfg, u: _Unit, w, b, stats: scoring.LayerStats | None, max_remove):
    groups = u.groups
    max_remove = max(0, max_remove)
    if cfg.score == "weight_norm":
        return scoring.eliminate_by_weight_norm(w, groups, max_remove), 1.0
    if cfg.repair:
        elim = scoring.eliminate_with_repair(stats.gram, w, b, groups, max_remove, ridge=cfg.ridge)
    else:
        elim = scoring.eliminate_without_repair(stats.gram, w, groups, max_remove)
    return elim, scoring.error_scale(stats, w, b)


# ----------------------------------------------------------------------- rewriting


def _rewrite(editor: GraphEditor, u: _Unit, keep: list[int], w_o: np.ndarray, b_o, *, add_bias: bool) -> None:
    att = u.att
    h, kv, d, n_rep = att.num_heads, att.num_kv_heads, att.head_size, u.n_rep
    h2, kv2 = len(keep) * n_rep, len(keep)
    q_heads = [g * n_rep + r for g in keep for r in range(n_rep)]
    q_cols, kv_cols = rewrite.group_columns(q_heads, d), rewrite.group_columns(keep, d)

    # everything downstream of the projections up to o: shape constants and stale shapes
    starts = [p.node.outputs[0] for p in (att.q, att.k, att.v, att.qkv) if p is not None]
    region = rewrite.region_between(starts, att.o.node)
    if att.qkv is not None:
        if att.qkv_layout == "interleaved":  # [group0: q heads, k, v | group1: ...]
            cols = rewrite.group_columns(keep, (n_rep + 2) * d)
        else:
            cols = np.concatenate([q_cols, h * d + kv_cols, (h + kv) * d + kv_cols])
        _slice_outputs(editor, att.qkv, cols)
    else:
        _slice_outputs(editor, att.q, q_cols)
        _slice_outputs(editor, att.k, kv_cols)
        _slice_outputs(editor, att.v, kv_cols)
    _slice_fused_bias(editor, att, q_cols, kv_cols)

    geometry = (h, kv, d, h2, kv2)
    nodes = list(dict.fromkeys([*region, *att.nodes, *att.head_shape_nodes]))
    for node in nodes:
        if node.op_type in ("Reshape", "Expand") and len(node.inputs) > 1:
            _patch_shape(editor, node, geometry, expand=node.op_type == "Expand")
        elif node.op_type == "Split" and len(node.inputs) > 1 and node.inputs[1] is not None:
            _patch_split(editor, node, geometry)
        elif node.op_type == "Slice" and att.qkv is not None and node.inputs[0] is att.qkv.output:
            _patch_packed_slice(editor, node, geometry)
    _patch_attributes(att, geometry)
    _patch_cache_shapes(att, kv2)

    rewrite.write_linear(editor, att.o, w_o, b_o, add_bias=add_bias)
    rewrite.clear_shapes([v for n in nodes for v in n.outputs])
    rewrite.clear_shapes([p.node.outputs[0] for p in (att.q, att.k, att.v, att.qkv) if p is not None])
    rewrite.clear_shapes([p.output for p in (att.q, att.k, att.v, att.qkv) if p is not None])


def _score_bias_inputs(att) -> list[tuple[ir.Node, int, ir.Value]]:
    """(node, input index, value) of every tensor added to the attention scores (the analysis'
    additive mask terms: padding and causal masks, position biases, ALiBi)."""
    return [(t.node, list(t.node.inputs).index(t.value), t.value) for t in att.mask_terms if not t.condition]


def _gather_score_biases(editor, u: _Unit, keep: list[int], shapes: dict[str, tuple[int, ...]]) -> None:
    att = u.att
    h = att.num_heads
    kept_heads = np.array([g * u.n_rep + r for g in keep for r in range(u.n_rep)], dtype=np.int64)
    for node, idx, value in _score_bias_inputs(att):
        const = stored_array(value)
        shape = const.shape if const is not None else shapes.get(value.name, _static_shape(value))
        if shape is None or len(shape) != 4 or shape[1] != h or h == 1:
            continue  # broadcast over heads (padding / causal masks): nothing to do
        index = editor.add_initializer(f"{value.name}_kept_heads", kept_heads)
        gather = ir.node("Gather", [value, index], attributes={"axis": 1},
                         name=editor.fresh_name(f"{node.name}/kept_heads"))
        gather.outputs[0].name = editor.fresh_name(f"{value.name}_kept")
        if value.dtype is not None:
            gather.outputs[0].type = ir.TensorType(value.dtype)
        editor.graph.insert_before(node, gather)
        node.replace_input_with(idx, gather.outputs[0])


def _static_shape(value: ir.Value) -> tuple | None:
    if value.shape is None or not all(isinstance(d, int) for d in value.shape):
        return None
    return tuple(value.shape)


def _slice_outputs(editor: GraphEditor, lin, cols: np.ndarray) -> None:
    w = rewrite.read_weight(lin)
    b = rewrite.read_bias(lin)
    rewrite.write_linear(editor, lin, w[:, cols], None if b is None else b[cols])


def _slice_fused_bias(editor, att, q_cols, kv_cols) -> None:
    """A fused attention node may carry the packed Q|K|V bias as an input (MultiHeadAttention's
    ``bias``) rather than after the projections."""
    node = att.fused_node
    spec = spec_for(node) if node is not None else None
    bias_input = spec.input(node, "bias") if spec is not None and "query" in spec.inputs else None
    bias = stored_array(bias_input)
    h, kv, d = att.num_heads, att.num_kv_heads, att.head_size
    if bias is None or bias.size != (h + 2 * kv) * d:
        return
    cols = np.concatenate([q_cols, h * d + kv_cols, (h + kv) * d + kv_cols])
    editor.set_constant(bias_input, bias.reshape(-1)[cols], [node])


def _new_dims(dims: list[int | None], geometry, expand: bool) -> list[int | None]:
    """The target shape with head counts replaced, by position: the last entry may be
    a width (heads x head size), the head axis is the first of the middle positions
    holding the head / KV count. In a 5-D repeat_kv shape [B, KV, n_rep, S, D] only
    the KV axis changes (n_rep is the same after pruning whole groups)."""
    h, kv, d, h2, kv2 = geometry
    widths = {h * d: h2 * d, kv * d: kv2 * d, (h + 2 * kv) * d: (h2 + 2 * kv2) * d}
    counts = {h: h2, kv: kv2}
    new = list(dims)
    r = len(new)
    if r >= 2 and new[-1] is not None and new[-1] in widths and new[-1] != d:
        new[-1] = widths[new[-1]]
        return new
    if r == 5 and new[2:] == [3, h, d] and h == kv:  # packed [B, S, 3, H, D] (ModernBERT's Wqkv)
        new[3] = h2
        return new
    if r == 5:  # [B, KV, n_rep, S, D]: position 2 is n_rep even when it equals the KV count
        if new[1] is not None and new[1] == kv:
            new[1] = kv2
        return new
    if r == 4 or (r == 3 and new[-1] == d):
        for i in range(1, r - 1):
            if new[i] is not None and new[i] > 0 and new[i] in counts:
                new[i] = counts[new[i]]
                break
    return new


def _patch_shape(editor, node: ir.Node, geometry, expand: bool) -> None:
    shape_in = node.inputs[1]
    dims = shape_elements(shape_in)
    if not dims:
        return
    new = _new_dims(dims, geometry, expand)
    if new != dims:
        rewrite.write_shape(editor, shape_in, dims, new, [node])


def _patch_split(editor, node: ir.Node, geometry) -> None:
    h, kv, d, h2, kv2 = geometry
    sizes = const_array(node.inputs[1])
    if sizes is None or sizes.ndim != 1:
        return
    widths = {h * d: h2 * d, kv * d: kv2 * d}
    if len(sizes) == 3 and all(int(s) in widths for s in sizes):
        editor.set_constant(node.inputs[1], np.asarray([widths[int(s)] for s in sizes], sizes.dtype), [node])


def _patch_packed_slice(editor, node: ir.Node, geometry) -> None:
    """A packed [Q|K|V] output cut by Slices on its last axis (Phi-3's qkv_proj): starts and
    ends are the blocks' offsets."""
    h, kv, d, h2, kv2 = geometry
    offsets = {0: 0, h * d: h2 * d, (h + kv) * d: (h2 + kv2) * d, (h + 2 * kv) * d: (h2 + 2 * kv2) * d}
    axes = const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else 3
    if axes is None or axes.shape != (1,) or int(axes[0]) not in (-1, rank - 1):
        return
    bounds = [const_array(node.inputs[i]) for i in (1, 2)]
    if any(b is None or b.shape != (1,) for b in bounds):
        return
    for value, b in zip(node.inputs[1:3], bounds, strict=True):
        if int(b[0]) in offsets and offsets[int(b[0])] != int(b[0]):
            editor.set_constant(value, np.asarray([offsets[int(b[0])]], b.dtype), [node])


def _patch_attributes(att, geometry) -> None:
    node = att.fused_node
    if node is None:
        return
    h, kv, d, h2, kv2 = geometry
    spec = spec_for(node)  # the op's names for its head counts
    for name, value in ((spec.num_heads, h2), (spec.kv_num_heads, kv2)):
        if name is not None and name in node.attributes:
            node.attributes[name] = ir.AttrInt64(name, value)
    if spec.qkv_sizes is not None and spec.qkv_sizes in node.attributes:
        node.attributes[spec.qkv_sizes] = ir.AttrInt64s(spec.qkv_sizes, [h2 * d, kv2 * d, kv2 * d])


def _patch_cache_shapes(att, kv2: int) -> None:
    """KV-cache inputs/outputs are [batch, kv_heads, seq, head_size]."""
    for value in (att.past_key, att.past_value, att.present_key, att.present_value):
        if value is None or value.shape is None or len(value.shape) != 4:
            continue
        dims = list(value.shape)
        dims[1] = kv2
        value.shape = ir.Shape(dims)


def _check_empty_past(model: ir.Model, ctx) -> None:
    """The same calibration feeds run through the model before and after pruning;
    ``runtime.session_feeds`` fits a zero-length KV cache to the new head count, but a
    cache holding data cannot be."""
    past = {v.name for v in model.graph.inputs if is_past_input(v.name)}
    batches = list(ctx.verification) + (list(ctx.calibration.batches) if ctx.calibration is not None else [])
    for feeds in batches:
        for name in past & set(feeds):
            if feeds[name].ndim == 4 and feeds[name].shape[2] != 0:
                raise OnnxpressError(
                    f"prune_heads: input {name} carries a non-empty KV cache in the calibration data; "
                    "calibrate with prompts only (empty past)"
                )
