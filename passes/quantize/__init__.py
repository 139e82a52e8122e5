"""Post-training int8 / int4 quantisation of a transformer's MatMuls.

Three modes, all emitting standard ops ORT's CPU provider fuses into integer kernels
(see :mod:`.graph`):

- ``static``: per-channel symmetric int8 weights, per-tensor activations (u8 by default:
  ORT's s8 QDQ kernels are 2-4x slower on AVX2) with calibrated ranges;
- ``dynamic``: the same weights, activations quantised at run time (DynamicQuantizeMatMul);
- ``weight_only``: int4/int8 block-quantised weights in ``com.microsoft.MatMulNBits``.

What keeps accuracy, in order: SmoothQuant (migrates activation outliers into the weights,
folded into the producer where exact); GPTQ (error-compensated weight rounding with
X^T X from calibration); per-tensor range choice (``auto`` scores minmax / percentile /
entropy / MSE by the consumer's output error on real rows); and a sensitivity search that
keeps the MatMuls that hurt the model output most in float until ``budget`` is met.
LayerNorm, Softmax, residual adds and attention-score MatMuls stay float; embedding tables are
stored int8 by rows, or under weight-only read from the codes of the LM head tied to them.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxpress.calibration import leading_batches
from onnxpress.cpu import has_int8_dot_products
from onnxpress.editing import GraphEditor
from onnxpress.errors import OnnxpressError
from onnxpress.fidelity import compare_outputs, next_token_nll, primary_outputs
from onnxpress.pass_infra import Outcome, Pass, PassConfig, register_pass
from onnxpress.passes.quantize import prefill_path  # noqa: F401  (registers the prefill_path pass)
from onnxpress.passes.quantize.calibrate import QParams, choose_range_for_linear, qparams_from_range
from onnxpress.passes.quantize.capture import SequentialHessians, capture_stats
from onnxpress.passes.quantize.fusion import fusion_report, graph_kernel_report
from onnxpress.passes.quantize.gptq import INT8_QMAX, ChannelQuantizer, channel_scales, gptq
from onnxpress.passes.quantize.graph import (
    CodeTable,
    QLinear,
    QuantRewriter,
    apply_smoothing,
    bias_add,
    find_linears,
)
from onnxpress.passes.quantize.smooth import choose_alpha, smooth_scales
from onnxpress.passes.quantize.weight_only import quantize_nbits, split_columns

log = logging.getLogger(__name__)

ROLES = ("q", "k", "v", "qkv", "o", "up", "gate", "down", "lm_head", "other")
# Above this many candidate MatMuls, sensitivity is estimated per MatMul from the captured
# rows instead of one model run per MatMul.
MEASURED_SENSITIVITY_LIMIT = 64
# int8 blocks of an LM head split by rows (int8 bears larger blocks: fewer scales to read)
INT8_ROWS_BLOCK = 64


@dataclass
class QuantizeConfig(PassConfig):
    mode: Literal["static", "dynamic", "weight_only"] = "static"
    # static: activation integer type; u8 runs 2-4x faster than s8 in ORT's AVX2 kernels
    activation_type: Literal["uint8", "int8"] = "uint8"
    # static u8: "contrib" writes QuantizeLinear -> com.microsoft.MatMulIntegerToFloat with the
    # bias inside (what ORT's CPU fusion makes of QDQ, minus the bias Add it leaves standing);
    # "qdq": the portable QuantizeLinear/DequantizeLinear pattern for any runtime to fuse
    static_format: Literal["contrib", "qdq"] = "contrib"
    # minmax by default: clipping an encoder's rare outlier activations (percentile, mse, or auto's choice
    # by the error on sampled rows, which seldom hold them) costs far more end to end than the
    # resolution it buys (MiniLM, bench/results/compare.json)
    calibration_method: Literal["minmax", "percentile", "entropy", "mse", "auto"] = "minmax"
    percentile: float = 99.99
    # per-tensor method overrides, "ROLE_OR_NODE_NAME=METHOD", e.g. ["down=percentile"]
    method_overrides: list[str] = field(default_factory=list)
    smooth: bool = True
    # static: shift each MatMul's bias by the mean output error its int8 weight and input add on
    # calibration rows of the float input (fast bias correction), where the MatMul has a bias
    bias_correction: bool = True
    smooth_alpha: float | None = None  # None: chosen per input among 0.3-0.8 or off, by quantised error
    smooth_roles: list[str] = field(default_factory=list)  # empty: all roles
    gptq: bool = True
    gptq_damp: float = 0.01
    gptq_block: int = 128
    # round the rows with the largest input energy first (GPTQ's act-order; static groups)
    gptq_act_order: bool = True
    # weight-only GPTQ: take each input's Hessian on the model as rounded so far, in graph order
    # (one forward pass segment by segment, one Hessian in memory at a time); off: every Hessian
    # from the float model in one capture, all held at once
    sequential: bool = True
    # int8 weights in +-64 instead of +-127. None: on when the CPU lacks VNNI, whose absence makes
    # ORT's u8 x s8 kernels use vpmaddubsw, which saturates int16 pair sums (measured: 3x the error)
    reduce_range: bool | None = None
    # accuracy budget; None: quantise everything eligible
    budget: float | None = None
    # rel_l2 / cosine: of the outputs on calibration batches; perplexity (decoders): relative
    # increase of the next-token perplexity of the held-out calibration text, the quantity a
    # decoder's users judge it by
    budget_metric: Literal["rel_l2", "cosine", "perplexity"] = "rel_l2"
    sensitivity: Literal["auto", "measured", "local"] = "auto"
    sensitivity_batches: int = 4  # batches of 8 samples (calibration.BATCH_SIZE), as calibration_batches
    exclude: list[str] = field(default_factory=list)  # roles or node names kept float
    calibration_batches: int = 32  # batches of 8 samples, however many samples a batch runs with
    # int8 storage of embedding tables (Gather) with per-row scales: 8, or 0 to keep them float
    embedding_bits: int = 8
    min_embedding_size: int = 1 << 20  # elements; small tables (positions, token types) stay float
    # weight_only
    bits: int = 4
    block_size: int = 32
    symmetric: bool = False
    lm_head_bits: int = 0  # 0: same as bits; 8: int8 blocks for the LM head; -1: keep it float
    lm_head_block_size: int = 0  # 0: same as block_size (int8 bears larger blocks: fewer scales to store)
    # the LM head's first rows (token ids) in int8 blocks of 64 and the rest in 4 bits (a tied embedding
    # reads each token's row from its kernel's codes): byte-level BPE vocabularies number tokens in
    # merge order, commonest first, so a few thousand rows carry most of what a 4-bit head loses
    # (SmolLM2: ids below 4,096 are three quarters of English text's tokens, below 16,384 over nine tenths)
    lm_head_int8_rows: int = 0
    # MatMuls of these roles in the outer layers (the first and last ``outer_layers`` share of
    # them, at least one at each end) get ``outer_bits`` in blocks of ``outer_block_size``
    # (0: block_size): int4's loss gathers there (SmolLM2: the down projections lose the most of
    # the layers' MatMuls, most of it in the first and last layers, bench/nbits_sensitivity.py;
    # llama.cpp's Q4_K_M widens the same ones)
    outer_roles: list[str] = field(default_factory=list)
    outer_layers: float = 0.125
    outer_bits: int = 8
    outer_block_size: int = 0
    # MatMulNBits' compute type: 0 float (the activations' type), 4 int8 activations (MLAS's
    # integer kernels: faster, and it rounds the activations, which some models do not bear)
    accuracy_level: int = 0
    # store the block scales as float16 (half their bytes; a quarter of a 4-bit model's are
    # scales at blocks of 32) behind a Cast to the activations' type, which ONNX Runtime folds
    # into a constant when it loads the model; the codes are rounded against the float16 scales
    float16_scales: bool = False
    # weight-only and dynamic: MatMuls reading one input (q/k/v, gate/up) become one kernel, split
    # after it (q/k/v: GroupQueryAttention's packed query input): one kernel call and one
    # activation quantisation per input instead of two or three (gate/up keep their Split: ORT
    # 1.32's com.microsoft.SwiGLU, which reads the packed pair, has no CPU kernel)
    pack: bool = True
    check_fusion: bool = True

    def validate(self) -> None:
        if not 50.0 < self.percentile <= 100.0:
            self.fail("percentile", "must be in (50, 100], e.g. 99.99")
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            self.fail("smooth_alpha", "must be between 0 and 1, e.g. 0.5")
        if self.gptq_damp < 0 or self.gptq_damp > 1:
            self.fail("gptq_damp", "must be between 0 and 1, e.g. 0.01")
        if self.gptq_block < 1:
            self.fail("gptq_block", "must be a positive integer, e.g. 128")
        if self.budget is not None and self.budget <= 0:
            self.fail("budget", "must be positive, e.g. 0.05 (relative L2), 0.005 (1 - cosine) or 0.02 (perplexity)")
        if self.embedding_bits not in (0, 8):
            self.fail("embedding_bits", "must be 8 (int8 rows) or 0 (keep embedding tables float)")
        if self.bits not in (4, 8):
            self.fail("bits", "must be 4 or 8")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            self.fail("accuracy_level", "must be 0 (float compute) to 4 (int8 activations)")
        if self.lm_head_bits not in (0, 4, 8, -1):
            self.fail("lm_head_bits", "must be 0 (same as bits), 4, 8 or -1 (keep float)")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            self.fail("block_size", "must be a power of two >= 16, e.g. 32, 64 or 128")
        if self.lm_head_int8_rows < 0:
            self.fail("lm_head_int8_rows", "must be 0 (off) or a number of vocabulary rows, e.g. 4096")
        if self.lm_head_int8_rows and (self.mode != "weight_only" or (self.lm_head_bits or self.bits) != 4):
            self.fail("lm_head_int8_rows", "needs mode weight_only with a 4-bit LM head (lm_head_bits: 4, "
                      "or bits: 4 with lm_head_bits: 0)")
        for name in ("lm_head_block_size", "outer_block_size"):
            size = getattr(self, name)
            if size and (size < 16 or size & (size - 1)):
                self.fail(name, "must be 0 (same as block_size) or a power of two >= 16, e.g. 64")
        if self.outer_bits not in (4, 8):
            self.fail("outer_bits", "must be 4 or 8")
        if not 0.0 < self.outer_layers <= 0.5:
            self.fail("outer_layers", "must be a share of the layers in (0, 0.5], e.g. 0.125 (an eighth at each end)")
        for role in self.outer_roles:
            if role not in ROLES:
                self.fail("outer_roles", f"has unknown role {role!r}; roles: {', '.join(ROLES)}")
        if self.sensitivity_batches < 1 or self.calibration_batches < 1:
            self.fail("sensitivity_batches", "and calibration_batches must be at least 1")
        for item in self.method_overrides:
            key, _, method = item.partition("=")
            if not key or method not in ("minmax", "percentile", "entropy", "mse", "auto"):
                self.fail(
                    "method_overrides",
                    f"entry {item!r} must look like 'down=percentile' "
                    "(method: minmax, percentile, entropy, mse or auto)",
                )
        for role in self.smooth_roles:
            if role not in ROLES:
                self.fail("smooth_roles", f"has unknown role {role!r}; roles: {', '.join(ROLES)}")


@register_pass
class QuantizePass(Pass):
    name = "quantize"
    config_class = QuantizeConfig
    needs_calibration = True
    # an estimate: static int8 keeps every MatMul input's statistics at once, sequential weight-only GPTQ one
    # Hessian and a layer's activations (a 0.74 B edge-int4 compile peaked at 2.25x, bench/results/large.json)
    memory_multiple = 4.4
    # of weights mapped from the input's data file (the rounded ones go to the compile's spill file):
    # the float copy of the weight being rounded, and static int8's statistics; int4 round-to-nearest
    # peaked at 0.46x (0.74 B) and 0.20x (7.4 B, bench/results/past_memory.json) the mapped float32
    # weights in anonymous memory
    mapped_memory_multiple = 0.5

    def __init__(self, config=None):
        super().__init__(config)
        cfg: QuantizeConfig = self.config
        # round-to-nearest dynamic / weight-only quantisation needs no data
        self.needs_calibration = cfg.mode == "static" or cfg.gptq or (cfg.mode == "dynamic" and cfg.smooth)

    # -- entry ---------------------------------------------------------------------------------

    def apply(self, model: ir.Model, ctx) -> Outcome:
        cfg: QuantizeConfig = self.config
        tmap = _try_analysis(ctx, model)
        # every rewrite stores weights of its own, so a tied LM head is taken too (only smoothing
        # edits weights in place, and it leaves such heads alone)
        linears, skipped = find_linears(model, tmap, transposed=True)
        for i, lin in enumerate(linears):  # trial models find the MatMuls again by name
            lin.node.name = lin.node.name or f"quantize_matmul_{i}"
        linears, excluded = _split_excluded(linears, cfg.exclude)
        reasons = {**skipped, **{lin.name: "excluded by config" for lin in excluded}}
        if not linears:
            return Outcome(
                changes={}, details={"kept_float": reasons, "note": "no MatMul with a constant weight"}
            )
        batches = None
        if ctx.calibration is not None:
            batches = leading_batches(ctx.calibration.batches, cfg.calibration_batches)
        elif self.needs_calibration:
            batches = ctx.require_calibration(self.name).batches
        if cfg.mode == "weight_only":
            return self._weight_only(model, ctx, linears, reasons, batches)
        return self._int8(model, ctx, linears, reasons, batches)

    # -- int8: static and dynamic --------------------------------------------------------------

    def _int8(self, model, ctx, linears, reasons, batches) -> Outcome:
        """Static or dynamic int8: smoothing and statistics, int8 weights, activation ranges
        (static), the budget's choice of MatMuls kept float, then the rewrite."""
        cfg: QuantizeConfig = self.config
        budget = self._budget_target(model, ctx, batches)
        smoothed, stats = self._smooth_and_capture(model, ctx, linears, batches)
        groups = _by_input(linears)
        # an unknown CPU gets the reduced range: the safe choice
        reduce_range = cfg.reduce_range if cfg.reduce_range is not None else not has_int8_dot_products()
        qmax = INT8_QMAX[reduce_range]
        weights = self._int8_weights(groups, stats, qmax)
        act = self._activation_ranges(groups, stats) if cfg.mode == "static" else {}
        shifts = _bias_shifts(linears, stats, weights, act) if cfg.mode == "static" and cfg.bias_correction else {}

        def build(target: ir.Model, chosen: list[QLinear]) -> int:
            """Quantise ``chosen`` and the embedding tables in ``target``; returns the tables' count.
            The budget's trial models are built by this too, so they measure what is written."""
            rw = QuantRewriter(target)
            nodes = {n.name: n for n in target.graph} if target is not model else None

            def in_target(lin: QLinear) -> QLinear:
                return lin if nodes is None else QLinear(nodes[lin.node.name], lin.role, lin.layer)

            if cfg.mode == "dynamic":
                for group in _dynamic_kernels(chosen, cfg.pack):
                    codes = np.concatenate([weights[id(lin)][0] for lin in group], axis=1)
                    scales = np.concatenate([weights[id(lin)][1] for lin in group])
                    rw.dynamic([in_target(lin) for lin in group], codes, scales)
            for lin in chosen if cfg.mode == "static" else ():
                codes, scales = weights[id(lin)]
                qp, _ = act[lin.input.name]
                if id(lin) in shifts:
                    rw.shift_bias(in_target(lin), shifts[id(lin)])
                rw.static(in_target(lin), codes, scales, qp.scale, qp.zero_point, qp.qtype, cfg.static_format)
            rw.finish()
            return self._embeddings(target)

        chosen, sensitivity, trials = list(linears), {}, []
        if budget is not None:
            reference, sens_batches, outputs = budget
            chosen, sensitivity, trials = self._budget_search(
                model, ctx, linears, build, reference, sens_batches, outputs, stats, weights, act
            )
            reasons.update({lin.name: "sensitivity" for lin in linears if lin not in chosen})
        in_names = {id(lin): lin.input.name for lin in linears}  # the rewrite detaches some nodes
        half = sum(1 for lin in chosen if lin.dtype != np.float32)
        tied_heads = sum(1 for lin in chosen if lin.transposed)
        merged = sum(len(k) - 1 for k in _dynamic_kernels(chosen, cfg.pack)) if cfg.mode == "dynamic" else 0
        embeddings = build(model, chosen)
        details = {
            "mode": cfg.mode,
            "activation_type": cfg.activation_type if cfg.mode == "static" else "uint8 (dynamic)",
            "weight_range": f"+-{qmax}",
            "matmuls": [
                _describe(lin, in_names[id(lin)], lin in chosen, reasons, smoothed, act, sensitivity)
                for lin in linears
            ],
            "kept_float": reasons,
            "range_methods": dict(Counter(m for _, m in act.values())),
            "budget_trials": trials,
        }
        if half:
            details["float32_islands"] = (
                f"ONNX Runtime's int8 MatMul kernels take float32 activations: {half} half-precision "
                "MatMuls read a float32 cast of their input and cast their output back"
            )
        changes = {
            "matmuls_quantized": len(chosen),
            "matmuls_kept_float": len(reasons),
            "kept_float_sensitivity": sum(1 for r in reasons.values() if r == "sensitivity"),
            "kept_float_op_type": sum(1 for r in reasons.values() if r.startswith("op type")),
            "matmuls_smoothed": sum(1 for lin in chosen if (_orig_input(lin) or in_names[id(lin)]) in smoothed),
            "matmuls_gptq": len(chosen) if cfg.gptq and batches else 0,
            "embeddings_int8": embeddings,
            "lm_head_from_tied_table": tied_heads,
            "biases_corrected": sum(1 for lin in chosen if id(lin) in shifts),
            "matmuls_cast_to_float32": half,
            "matmuls_merged": merged,  # into the kernel of another reading the same input
        }
        return self._finish(model, changes, details)

    def _budget_target(self, model, ctx, batches):
        """(reference outputs, batches, output names) the budget is measured on, or None without
        a budget. Perplexity budgets use the held-out batches: GPTQ and smoothing fit the
        calibration ones, where the cost reads low (SmolLM2: +1.2% there, +2.2% on held-out windows)."""
        cfg: QuantizeConfig = self.config
        if cfg.budget is None:
            return None
        outputs = ctx.output_names or primary_outputs(model)
        sens_batches = leading_batches(batches or ctx.verification, cfg.sensitivity_batches)
        if cfg.budget_metric == "perplexity":
            sens_batches = leading_batches(ctx.verification, cfg.sensitivity_batches)
            if "logits" not in outputs or not all("input_ids" in b for b in sens_batches):
                raise OnnxpressError(
                    "quantize: budget_metric perplexity needs a decoder with a 'logits' output and text "
                    "calibration (input_ids); use budget_metric rel_l2 or cosine for this model"
                )
            outputs = ["logits"]
        # smoothing is exact in float, so the reference can come from the model as given
        return ctx.run(model, sens_batches, outputs), sens_batches, outputs

    def _smooth_and_capture(self, model, ctx, linears, batches) -> tuple[dict[str, str], dict]:
        """SmoothQuant (where configured) and the statistics of the MatMul inputs it leaves:
        {input: where smoothing was folded}, {input name: TensorStats}."""
        cfg: QuantizeConfig = self.config
        if not batches:
            return {}, {}
        need_gram = cfg.gptq
        if cfg.mode == "static" and cfg.smooth:
            # static ranges need histograms of the smoothed inputs: capture again after smoothing
            smoothed, _ = self._smooth(model, linears, self._capture(model, ctx, linears, batches, False))
            return smoothed, self._capture(model, ctx, linears, batches, need_gram)
        # one pass over the data: the smoothed inputs' statistics follow from x / s
        raw = self._capture(model, ctx, linears, batches, need_gram)
        smoothed, scales = self._smooth(model, linears, raw) if cfg.smooth else ({}, {})
        stats = {}
        for lin in linears:
            src = _orig_input(lin) or lin.input.name
            if src in raw:
                stats[lin.input.name] = raw[src].scaled(scales[src]) if src in scales else raw[src]
        return smoothed, stats

    def _int8_weights(self, groups, stats, qmax: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Per MatMul (by id): int8 codes and per-channel scales; one GPTQ run per input (q/k/v,
        gate/up share one Hessian factorisation, their columns are independent)."""
        weights = {}
        for name, group in groups.items():
            codes, scales = _quantize_int8_weight(
                np.concatenate([lin.weight_array() for lin in group], axis=1), _hessian(stats.get(name)), qmax,
                self.config,
            )
            for lin, cols in zip(group, _column_splits(group), strict=True):
                weights[id(lin)] = (codes[:, cols], scales[cols])
        return weights

    def _activation_ranges(self, groups, stats) -> dict[str, tuple[QParams, str]]:
        """Static activation quantisation per input: (QParams, the range method chosen)."""
        cfg: QuantizeConfig = self.config
        return {
            name: choose_range_for_linear(stats[name].hist, stats[name].sample, [g.weight_array() for g in group],
                                          _method_for(group, cfg), cfg.activation_type, cfg.percentile)
            for name, group in groups.items()
        }

    def _embeddings(self, model) -> int:
        cfg: QuantizeConfig = self.config
        if not cfg.embedding_bits:
            return 0
        rw = QuantRewriter(model)
        gathers = [
            n
            for n in model.graph
            if n.op_type == "Gather"
            and n.inputs[0] is not None
            and n.inputs[0].const_value is not None
            and n.inputs[0].const_value.size >= cfg.min_embedding_size
        ]
        done = sum(rw.embedding(n) for n in gathers)
        rw.finish()
        return done

    def _capture(self, model, ctx, linears, batches, gram: bool):
        cfg: QuantizeConfig = self.config
        names = list(_by_input(linears))
        return capture_stats(
            model,
            batches,
            names,
            gram_names=names if gram else (),
            sample_rows=512 if cfg.mode == "static" or cfg.smooth or cfg.budget is not None else 0,
            threads=ctx.threads,
            seed=ctx.seed,
        )

    def _smooth(self, model, linears, stats) -> tuple[dict[str, str], dict[str, np.ndarray]]:
        """SmoothQuant on every input group whose roles are selected.
        Returns {input: where folded} and {input: the scales s (the input became x / s)}."""
        cfg: QuantizeConfig = self.config
        groups = {
            name: g
            for name, g in _by_input(linears).items()
            if (not cfg.smooth_roles or any(lin.role in cfg.smooth_roles for lin in g))
            and not any(lin.transposed for lin in g)  # a tied table's rows would change for the Gather too
        }
        done, applied, self._alphas = {}, {}, {}
        editor = GraphEditor(model)
        qtype = cfg.activation_type if cfg.mode == "static" else "uint8"
        for name, group in groups.items():
            st = stats.get(name)
            if st is None or st.absmax is None:
                continue
            weights = [lin.weight_array() for lin in group]
            alpha = cfg.smooth_alpha
            if alpha is None:
                # scored with the range the input will get (dynamic: each row's min/max; "auto" chooses
                # after smoothing, so the outlier-keeping min/max stands in for it)
                method = _method_for(group, cfg) if cfg.mode == "static" else "minmax"
                alpha, _, _ = choose_alpha(st.absmax, st.sample, weights, qtype,
                                           "minmax" if method == "auto" else method)
            self._alphas[name] = alpha
            if alpha is None:
                continue
            s = smooth_scales(st.absmax, weights, alpha)
            done[name] = f"{apply_smoothing(editor, group[0].input, group, s)} (alpha {alpha})"
            applied[name] = s
            for lin in group:
                lin.node.meta["onnxpress_smoothed_input"] = name
        model.graph.sort()
        return done, applied

    def _budget_search(self, model, ctx, linears, build, reference, batches, outputs, stats, weights, act):
        """Keep the most sensitive MatMuls float until the calibration error meets the budget.

        Sensitivity = output error with that MatMul alone quantised (one model run each), or for
        large models its local relative output error on the captured rows. The number kept float
        is then found by doubling + bisection over that order (monotone in practice)."""
        cfg: QuantizeConfig = self.config
        trials = []
        if cfg.budget_metric == "perplexity":
            reference_nll = next_token_nll(reference, batches)[0]

        def error(chosen) -> float:
            trial = model.clone()
            build(trial, chosen)
            trial_outputs = ctx.run(trial, batches, outputs)
            if cfg.budget_metric == "perplexity":
                value = math.exp(next_token_nll(trial_outputs, batches)[0] - reference_nll) - 1.0
            else:
                fid = compare_outputs(reference, trial_outputs)
                value = fid.rel_l2 if cfg.budget_metric == "rel_l2" else 1.0 - fid.cosine_mean
            trials.append({"quantized": len(chosen), "error": value})
            return value

        if error(linears) <= cfg.budget:
            return list(linears), {}, trials
        mode = cfg.sensitivity
        if mode == "auto":
            mode = "measured" if len(linears) <= MEASURED_SENSITIVITY_LIMIT else "local"
        if mode == "measured":
            sensitivity = {lin.name: error([lin]) for lin in linears}
        else:
            sensitivity = {lin.name: _local_error(lin, stats, weights, act, cfg) for lin in linears}
        order = sorted(linears, key=lambda lin: -sensitivity[lin.name])

        def quantized_with(k_float: int):
            return [lin for lin in linears if lin not in order[:k_float]]

        lo, hi, step = 0, None, 1  # lo: fails the budget; hi: meets it
        while hi is None:
            k = min(step, len(order))
            if error(quantized_with(k)) <= cfg.budget:
                hi = k
            else:
                lo = k
                if k == len(order):
                    hi = k
            step *= 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if error(quantized_with(mid)) <= cfg.budget:
                hi = mid
            else:
                lo = mid
        return quantized_with(hi), sensitivity, trials

    # -- weight only ---------------------------------------------------------------------------

    def _weight_only(self, model, ctx, linears, reasons, batches) -> Outcome:
        cfg: QuantizeConfig = self.config
        hessian = self._hessians(model, ctx, linears, batches)
        rw = QuantRewriter(model)
        done, per_bits = [], Counter()
        by_bits: dict[tuple[str, int, int], list[QLinear]] = {}
        outer = _outer_layers(linears, cfg.outer_layers) if cfg.outer_roles else set()
        for lin in linears:
            bits, block = cfg.bits, cfg.block_size
            if lin.role in cfg.outer_roles and lin.layer in outer:
                bits, block = cfg.outer_bits, cfg.outer_block_size or block
            if lin.role == "lm_head":
                if cfg.lm_head_bits < 0:
                    reasons[lin.name] = "lm_head kept float by config"
                    continue
                bits, block = cfg.lm_head_bits or bits, cfg.lm_head_block_size or block
            by_bits.setdefault((lin.input.name, bits, block), []).append(lin)
        # each input's first reader in graph order; sequential GPTQ rounds the groups in that order
        order = {id(node): i for i, node in enumerate(model.graph)}
        first: dict[str, ir.Node] = {}
        for lin in sorted((lin for group in by_bits.values() for lin in group), key=lambda lin: order[id(lin.node)]):
            first.setdefault(lin.input.name, lin.node)
        by_bits = dict(sorted(by_bits.items(), key=lambda item: order[id(first[item[0][0]])]))
        tied_heads = sum(1 for group in by_bits.values() for lin in group if lin.role == "lm_head" and lin.transposed)
        # embedding Gathers reading a tied head's table: they will read the head's codes instead
        tables = [(lin, gather) for group in by_bits.values() for lin in group
                  if lin.role == "lm_head" and lin.transposed and cfg.embedding_bits
                  for gather in _table_gathers(lin)]
        heads, merged, int8_rows = {}, 0, 0
        for (name, bits, block), group in by_bits.items():
            # one GPTQ run per input (q/k/v, gate/up): one Hessian factorisation, columns independent
            weights = [lin.weight_array() for lin in group]
            weight = weights[0] if len(weights) == 1 else np.concatenate(weights, axis=1)
            del weights  # a large LM head: one float copy of it, not two
            quantize = functools.partial(
                quantize_nbits,
                symmetric=cfg.symmetric,
                hessian=hessian(name, first[name]) if hessian else None,
                damp=cfg.gptq_damp,
                act_order=cfg.gptq_act_order,
                scale_dtype=np.float16 if cfg.float16_scales or group[0].dtype == np.float16 else np.float32,
                keep_dequantized=False,
            )
            head = group[0] if group[0].role == "lm_head" and len(group) == 1 else None
            if head is not None and 0 < cfg.lm_head_int8_rows < weight.shape[1]:
                int8_rows = cfg.lm_head_int8_rows
                parts = [quantize(weight[:, :int8_rows], 8, INT8_ROWS_BLOCK), quantize(weight[:, int8_rows:], bits, block)]
                heads[id(head)] = [CodeTable.of_kernel(k) for k in rw.nbits_by_rows(head, parts, cfg.accuracy_level)]
            elif cfg.pack:
                node = rw.nbits(group, quantize(weight, bits, block), cfg.accuracy_level)
                merged += len(group) - 1
            else:
                nw = quantize(weight, bits, block)
                for lin, cols in zip(group, _column_splits(group), strict=True):
                    node = rw.nbits([lin], split_columns(nw, cols), cfg.accuracy_level)
            if head is not None and id(head) not in heads:
                heads[id(head)] = [CodeTable.of_kernel(node)]
            done += group
            per_bits[bits] += len(group)
        tied_tables = sum(rw.tied_embedding(gather, heads[id(lin)]) for lin, gather in tables if id(lin) in heads)
        rw.finish()
        changes = {
            "matmuls_quantized": len(done),
            "matmuls_kept_float": len(reasons),
            "kept_float_op_type": sum(1 for r in reasons.values() if r.startswith("op type")),
            "matmuls_gptq": len(done) if hessian else 0,
            **{f"matmuls_int{b}": n for b, n in per_bits.items()},
            "matmuls_merged": merged,  # into the kernel of another reading the same input
            "lm_head_from_tied_table": tied_heads,
            "embeddings_from_lm_head_codes": tied_tables,
            "embeddings_int8": self._embeddings(model),
            "lm_head_int8_rows": int8_rows,
        }
        details = {
            "mode": "weight_only",
            "bits": cfg.bits,
            "block_size": cfg.block_size,
            "symmetric": cfg.symmetric,
            "accuracy_level": cfg.accuracy_level,
            "float16_scales": cfg.float16_scales,
            "outer": {"roles": cfg.outer_roles, "layers": sorted(outer), "bits": cfg.outer_bits} if outer else None,
            "kept_float": reasons,
        }
        if int8_rows and batches:  # how much of the text the int8 rows cover
            ids = np.concatenate([b["input_ids"][b["attention_mask"] > 0] if "attention_mask" in b else
                                  b["input_ids"].ravel() for b in batches if "input_ids" in b] or [np.zeros(0)])
            details["lm_head_int8_rows_token_share"] = float(np.mean(ids < int8_rows)) if ids.size else None
        return self._finish(model, changes, details)

    def _hessians(self, model, ctx, linears, batches) -> Callable[[str, ir.Node], np.ndarray | None] | None:
        """GPTQ's Hessian of a MatMul input by name (and its first reader); None without GPTQ."""
        cfg: QuantizeConfig = self.config
        if not (cfg.gptq and batches):
            return None
        if cfg.sequential:
            return SequentialHessians(model, batches, ctx.threads)
        names = list(_by_input(linears))
        stats = capture_stats(model, batches, names, gram_names=names, sample_rows=0, threads=ctx.threads,
                              seed=ctx.seed)
        return lambda name, _first: _hessian(stats.get(name))

    def _finish(self, model, changes, details) -> Outcome:
        if self.config.check_fusion:
            fusion = graph_kernel_report(model) if details.get("mode") == "weight_only" else fusion_report(model)
            details["ort_fusion"] = fusion
            changes["fused_integer_kernels"] = fusion["fused"]
            if fusion["unfused"]:
                details["unfused_qdq"] = (
                    f"{fusion['unfused']} DequantizeLinear outputs still feed float ops "
                    f"after ORT optimisation: {fusion['unfused_dq_consumers']}"
                )
        return Outcome(changes=changes, details=details)


# -- helpers -------------------------------------------------------------------------------------


def _dynamic_kernels(chosen: list[QLinear], pack: bool) -> list[list[QLinear]]:
    """The MatMuls each dynamic int8 kernel computes: those reading one float32 input together
    when packing, else one each (a half-precision MatMul is cast to a float32 island of its own)."""
    if not pack:
        return [[lin] for lin in chosen]
    kernels: dict[str, list[QLinear]] = {}
    for lin in chosen:
        key = lin.input.name if lin.dtype == np.float32 else lin.name
        kernels.setdefault(key, []).append(lin)
    return list(kernels.values())


def _outer_layers(linears: list[QLinear], share: float) -> set[int]:
    """The layer indices in the first and last ``share`` of the layers (at least one at each end)."""
    count = 1 + max((lin.layer for lin in linears if lin.layer is not None), default=-1)
    k = max(1, round(share * count))
    return set(range(min(k, count))) | set(range(max(count - k, 0), count))


def _table_gathers(lin: QLinear) -> list[ir.Node]:
    """The row Gathers (axis 0) of the table a tied LM head reads through its Transpose."""
    table = lin.weight.producer().inputs[0]
    return [node for node, index in table.uses()
            if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and index == 0
            and node.attributes.get_int("axis", 0) == 0]


def _try_analysis(ctx, model):
    try:
        return ctx.analysis(model)
    except ImportError:
        return None
    except Exception as exc:  # the analysis is an aid here (roles), never a requirement
        log.info("quantize: analysis failed (%s); treating every MatMul as generic", exc)
        return None


def _split_excluded(linears, exclude):
    keep, out = [], []
    for lin in linears:
        (out if lin.role in exclude or lin.name in exclude else keep).append(lin)
    return keep, out


def _by_input(linears: list[QLinear]) -> dict[str, list[QLinear]]:
    groups: dict[str, list[QLinear]] = {}
    for lin in linears:
        groups.setdefault(lin.input.name, []).append(lin)
    return groups


def _column_splits(group: list[QLinear]) -> list[slice]:
    """Each MatMul's columns in the concatenation of its group's weights."""
    out, start = [], 0
    for lin in group:
        n = lin.weight_array().shape[1]
        out.append(slice(start, start + n))
        start += n
    return out


def _orig_input(lin: QLinear) -> str:
    return lin.node.meta.get("onnxpress_smoothed_input", "")


def _method_for(group: list[QLinear], cfg: QuantizeConfig) -> str:
    for item in cfg.method_overrides:
        key, _, method = item.partition("=")
        if any(lin.role == key or lin.name == key for lin in group):
            return method
    return cfg.calibration_method


def _hessian(st) -> np.ndarray | None:
    """GPTQ's Hessian X^T X of a group's input, when its statistics hold one."""
    return None if st is None or st.gram is None else st.gram.xtx


def _quantize_int8_weight(w: np.ndarray, gram, qmax: int, cfg: QuantizeConfig):
    """Per-channel symmetric int8 codes and scales, GPTQ-rounded when a Hessian is given."""
    diag = np.diag(gram) if gram is not None else None
    scales = channel_scales(w, qmax, clip_search=gram is not None, hessian_diag=diag)
    quantizer = ChannelQuantizer(scales, qmax)
    if gram is not None and cfg.gptq:
        deq = gptq(w, gram, quantizer, block=cfg.gptq_block, damp=cfg.gptq_damp, act_order=cfg.gptq_act_order)
        codes = np.round(deq / scales.astype(np.float64))
    else:
        codes = quantizer.codes(w.astype(np.float64))
    return np.clip(codes, -qmax, qmax).astype(np.int8), scales


def _bias_shifts(linears, stats, weights, act) -> dict[int, np.ndarray]:
    """Per MatMul (by id) with a bias: the mean of (int8 output - float output) per output channel,
    E[x] (Wq - W) over every calibration token plus E[fq(x) - x] Wq over the sampled rows (the
    range's clipping, which does not average out), to subtract from its bias."""
    shifts = {}
    for lin in linears:
        st = stats.get(lin.input.name)
        w = lin.weight_array().astype(np.float64)
        has_bias = bias_add(lin.node, w.shape[1])[0] is not None
        if st is None or st.sample is None or not len(st.sample) or lin.input.name not in act or not has_bias:
            continue
        codes, scales = weights[id(lin)]
        wq = codes.astype(np.float64) * scales[None, :].astype(np.float64)
        mean_x = st.gram.mean if st.gram is not None else st.sample.mean(0, dtype=np.float64)
        x = st.sample.astype(np.float64)
        clip = (act[lin.input.name][0].fake_quant(st.sample).astype(np.float64) - x).mean(0)
        shifts[id(lin)] = mean_x @ (wq - w) + clip @ wq
    return shifts


def _local_error(lin, stats, weights, act, cfg) -> float:
    """Relative error of this MatMul's output on the captured rows when it alone is quantised."""
    st = stats.get(lin.input.name)
    w = lin.weight_array()
    codes, scales = weights[id(lin)]
    wq = codes.astype(np.float32) * scales[None, :]
    if st is None or st.sample is None or not len(st.sample):
        return float(np.linalg.norm(wq - w) / max(np.linalg.norm(w), 1e-30))
    x = st.sample
    if lin.input.name in act:
        xq = act[lin.input.name][0].fake_quant(x)
    else:  # dynamic: a batch's range spans the whole calibration range (outlier tokens included)
        xq = qparams_from_range(st.hist.min, st.hist.max, "uint8").fake_quant(x)
    ref = x @ w
    return float(np.linalg.norm(xq @ wq - ref) / max(np.linalg.norm(ref), 1e-30))


def _describe(lin, input_name, quantized, reasons, smoothed, act, sensitivity) -> dict:
    entry = {"name": lin.node.name, "role": lin.role, "layer": lin.layer, "quantized": quantized}
    if not quantized:
        entry["reason"] = reasons.get(lin.node.name, "")
    src = _orig_input(lin) or input_name
    if src in smoothed:
        entry["smoothed_into"] = smoothed[src]
    if input_name in act:
        qp, method = act[input_name]
        entry.update(range_method=method, act_scale=qp.scale, act_zero_point=qp.zero_point)
    if lin.name in sensitivity:
        entry["sensitivity"] = sensitivity[lin.name]
    return entry
