"""Low-rank splitting: ``X @ W`` -> ``(X @ A) @ B`` with A [d_in, r], B [r, d_out].

Calibration -> decision -> rewrite:

1. the matrices: every attention Q/K/V/O and FFN up/gate/down matrix by default, or chosen roles
   from the analysis map, or any constant-weight MatMul/Gemm whose node or weight name matches a regex;
2. capture the Gram matrix X^T X of each matrix's input on calibration data and
   decompose each W by activation-aware (whitened) SVD, whose dropped singular values
   are the output error on that data (``method: plain`` = SVD of W, the baseline);
3. choose ranks under one budget: ``fraction`` of the parameters (or MACs) of all the layers'
   linear matrices (``scope: linear``) or of the selected ones (``scope: selected``);
   ``probe`` (default: greedy on the model's measured output loss per parameter saved, each
   (layer bucket, role) unit split alone at a few shares, :mod:`.probe`), ``uniform``
   (every selected matrix loses the same share) or ``global`` (greedy on each matrix's own
   normalised truncation loss, a proxy); a rank at which the two factors would cost as much
   as W is never used;
4. fit and rewrite; with ``sequential`` the factors of each group of matrices are fitted
   on the inputs of the model compressed so far, by least squares to the original
   outputs X W, so later layers absorb earlier errors (``residual_correction``: a matrix
   feeding a residual Add also cancels what it can of the residual stream's upstream
   error); ``refit_prior`` pulls those least-squares refits towards W (they over-fit when the
   calibration has few tokens per input dimension); ``bias_correction`` restores the mean
   output on calibration data. The sequential inputs come from running the model segment
   by segment (:class:`onnxpress.activations.SegmentStream`).

The numerics are in :mod:`.fit` and :mod:`onnxpress.factorization`; bench/bench_lowrank.py
compares the options end to end on MiniLM and SmolLM2 and motivates the defaults.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_ir as ir
from threadpoolctl import threadpool_limits

from onnxpress import factorization as fz
from onnxpress.activations import capture_grams
from onnxpress.analysis.matrices import ROLES, Matrix, select_matrices
from onnxpress.calibration import trim_padding
from onnxpress.editing import GraphEditor, remove_dead_nodes
from onnxpress.errors import OnnxpressError
from onnxpress.fidelity import primary_outputs
from onnxpress.pass_infra import Outcome, Pass, PassConfig, register_pass
from onnxpress.passes.lowrank import fit, probe
from onnxpress.weight_probe import Prober, first_samples

# every role: with the probe allocation the measured losses decide which matrices give the budget
# (on MiniLM it splits attention Q/K hardest and keeps some FFN matrices whole; bench/bench_lowrank.py)
DEFAULT_INCLUDE = ROLES


@dataclass
class LowRankConfig(PassConfig):
    # share of parameters (target=params) or MACs per token (target=macs) to remove; for these
    # matrices both are r * (d_in + d_out) after a split, so the ranks are the same
    fraction: float = 0.2
    # what ``fraction`` is a share of: "linear" = all the layers' attention Q/K/V/O + FFN matrices
    # of the analysis map (whichever ``include`` selects), "selected" = the selected matrices only
    scope: Literal["linear", "selected"] = "linear"
    target: Literal["params", "macs"] = "params"
    method: Literal["whitened", "plain"] = "whitened"
    # uniform: every selected matrix loses the same share; global: greedy on each matrix's own
    # normalised truncation loss (a proxy); probe: greedy on the model's measured output loss
    # with units of matrices split alone at a few shares (.probe)
    allocation: Literal["uniform", "global", "probe"] = "probe"
    # calibration sequences the probes run on (the first ones); every probe is a forward pass on them
    probe_samples: int = 8
    # roles (ffn.up, attn.q, ...) from the analysis map, or regexes on node / weight names
    include: list[str] = field(default_factory=lambda: list(DEFAULT_INCLUDE))
    sequential: bool = True
    bias_correction: bool = True
    # sequential fits of matrices feeding a residual Add (attention O, FFN down) also cancel what
    # their inputs predict of the upstream error already in the residual stream
    residual_correction: bool = True
    eps: float = fz.DEFAULT_EPS  # Cholesky ridge, relative to the mean Gram diagonal
    # sequential least-squares refits are pulled towards the original W with the weight of this many
    # isotropic pseudo-tokens per input dimension: the refit has d_in unknowns per output and
    # over-fits when the calibration has few tokens per input dimension (SmolLM2's down_proj)
    refit_prior: float = 1.0
    max_batches: int | None = None  # calibration batches of 8 samples used (None: all)

    def validate(self) -> None:
        if not 0 < self.fraction < 1:
            self.fail("fraction", f"must be between 0 and 1 (share of parameters removed), got {self.fraction}")
        if not self.include:
            self.fail("include", f"must name at least one matrix role ({', '.join(ROLES)}) or regex")
        for pattern in self.include:
            if pattern not in ROLES:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    self.fail("include", f"entry {pattern!r} is neither a role ({', '.join(ROLES)}) nor a regex ({exc})")
        if self.refit_prior < 0:
            self.fail("refit_prior", f"must be >= 0 (pseudo-tokens per input dimension), got {self.refit_prior}")
        if not 0 <= self.eps < 1:
            self.fail("eps", f"must be in [0, 1), e.g. 1e-4, got {self.eps}")
        if self.probe_samples < 1:
            self.fail("probe_samples", f"must be a positive number of sequences, got {self.probe_samples}")
        if self.max_batches is not None and self.max_batches < 1:
            self.fail("max_batches", f"must be a positive number of batches, got {self.max_batches}")


@register_pass
class LowRankPass(Pass):
    name = "lowrank"
    config_class = LowRankConfig
    needs_calibration = True

    def apply(self, model: ir.Model, ctx) -> Outcome:
        # One BLAS thread for the numerics (ORT keeps its own pool): OpenBLAS threads spin-wait,
        # and on a shared machine an SVD with several of them ran ~20x slower than with one.
        with threadpool_limits(limits=1):
            return self._apply(model, ctx)

    def _apply(self, model: ir.Model, ctx) -> Outcome:
        cfg: LowRankConfig = self.config
        batches = ctx.calibration_batches(self.name, cfg.max_batches)
        batches = [trim_padding(feeds) for feeds in batches]
        needs_map = cfg.scope == "linear" or any(p in ROLES for p in cfg.include)
        tmap = ctx.analysis(model) if needs_map else None
        matrices = [m for m in select_matrices(model, cfg.include, tmap) if fz.break_even_rank(m.d_in, m.d_out) >= 1]
        if not matrices:
            return Outcome(changes={"matrices_split": 0}, details={"reason": "no splittable matrix selected"})
        base = budget_base(model, matrices, tmap, cfg.scope)
        budget = cfg.fraction * base
        most = sum(m.d_in * m.d_out - fz.factor_cost(1, m.d_in, m.d_out) for m in matrices)
        if budget > most:
            raise OnnxpressError(f"lowrank: removing {cfg.fraction:.0%} of the {cfg.scope} parameters needs more than "
                                 f"the selected matrices can give ({most / base:.0%} at rank 1): include more roles "
                                 "or lower fraction")
        threads = getattr(ctx, "threads", None)
        sequential = cfg.sequential and cfg.method == "whitened"
        # a sequential fit gathers its own statistics while it streams the model
        needs_stats = cfg.allocation != "uniform" or (not sequential and (cfg.method == "whitened" or cfg.bias_correction))
        stats = {}
        if needs_stats:
            # float32 products per batch (see Gram); only the nodes up to the last input run
            stats = capture_grams(model, batches, sorted({m.input.name for m in matrices}), products=np.float32,
                                  prune=True, threads=threads, desc="lowrank: input statistics").grams
        if cfg.allocation == "probe":
            outputs = getattr(ctx, "output_names", None) or primary_outputs(model)
            prober = Prober(model, matrices, first_samples(batches, cfg.probe_samples), outputs, threads)
            means = [stats[m.input.name].mean for m in matrices] if cfg.bias_correction else None
            plan = probe.probe_ranks(prober, matrices, [stats[m.input.name].xtx for m in matrices], means,
                                     budget, cfg.eps)
        else:
            plan = fit.plan_ranks(matrices, stats, cfg, budget=budget)
        chosen = [(m, r) for m, r in zip(matrices, plan, strict=True) if r is not None]
        if sequential:
            errors, tokens = fit.fit_sequential(model, chosen, batches, cfg, threads)
        else:
            errors, editor = {}, GraphEditor(model)
            for m, r in chosen:
                errors[m.key] = fit.fit_and_split(editor, m, r, stats.get(m.input.name), cfg)
            tokens = max((s.count for s in stats.values()), default=0)
        remove_dead_nodes(model)
        saved = sum(m.d_in * m.d_out - fz.factor_cost(r, m.d_in, m.d_out) for m, r in chosen)
        return Outcome(
            changes={"matrices_split": len(chosen)},
            details={
                "method": cfg.method,
                "allocation": cfg.allocation,
                "sequential": cfg.sequential and cfg.method == "whitened",
                "params_saved": int(saved),  # = MACs per token saved
                "scope": cfg.scope,
                "fraction_saved": saved / base,  # of the scope's parameters (and MACs)
                "fraction_saved_of_selected": saved / sum(m.d_in * m.d_out for m in matrices),
                "target": cfg.target,
                "calibration_tokens": int(tokens),
                "ranks": {m.key: {"rank": r, "shape": [m.d_in, m.d_out], "fit_error": errors.get(m.key)}
                          for m, r in chosen},
            },
        )


def budget_base(model: ir.Model, matrices: list[Matrix], tmap, scope: str) -> int:
    """Parameters that ``fraction`` is a share of: the selected matrices, or (scope "linear")
    those together with every attention/FFN matrix of the analysis map."""
    sizes = {id(m.node): m.d_in * m.d_out for m in matrices}
    if scope == "linear" and tmap is not None:
        for m in select_matrices(model, list(ROLES), tmap):
            sizes.setdefault(id(m.node), m.d_in * m.d_out)
    return sum(sizes.values())
