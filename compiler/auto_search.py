"""Accuracy-budgeted automatic compression: ``onnxpress compile MODEL --budget 0.01``.

**Fidelity loss** (what ``budget`` bounds) is measured against the uncompressed model on
the held-out split of the calibration data (``compile.VERIFY_FRACTION`` of it, never used
to fit anything) and, with named calibration data, on as many held-out samples of the
corpus the calibration never drew from: structured compression fitted on one domain loses
more on another, so a candidate is judged by the worse of the two. A candidate **fits**
when the upper end of that loss's confidence interval (mean + ``CONFIDENCE_Z`` standard
errors over the samples) is within the budget: a split is a few dozen samples, and a mean
just under the budget there lands over it on other text as often as not:

- encoders: ``1 - mean cosine`` of the sentence embeddings (first output, mean-pooled
  over the attention mask) of the held-out text's sentences (``compile.measured_part``),
  the measure the packaged recipes are described by; a model without an attention mask:
  ``1 - mean row cosine`` of its outputs;
- decoders (models with a ``logits`` output): the relative increase in perplexity of
  the held-out text, ``ppl / ppl_reference - 1``.

(``onnxpress.fidelity.FidelityMeter``, the same measure the compile report gives per stage.)

**Search** (greedy; every step starts from the model the previous accepted step left,
so statistics already paid for are not recomputed from the original):

1. base: ``cleanup``; every candidate is measured with exact attention substitution
   applied last (where attention is recognised) and, for decoders, the exact decoder fusions
   (``fuse``), as distillation needs the decomposed graph;
2. the last-stage family (``quantize``) alone on the base gives its loss ``L_q``: encoders
   static int8, decoders the weight-only quantisation of the ``balanced`` (latency) or
   ``edge-int4`` (size) recipe; when a static int8 ``L_q`` exceeds the budget the quantize
   pass's own sensitivity search keeps the most sensitive MatMuls in float (the "layers
   left untouched");
3. each structural family in turn (latency: ``prune_ffn``, ``prune_heads``; size:
   ``lowrank``, ``prune_ffn``) gets a few probes of its strength, each probe the structural
   step followed by ``distill`` (when the calibration is text: one candidate, recovered
   towards the original): the first at a low strength, the next ones interpolated on a
   power-law fit of loss against strength (a secant search, not a grid); a probe fits when
   its loss bound plus ``L_q`` is within the budget, and the strongest fitting probe
   becomes the stage the next family starts from;
4. the structural stage plus quantize is measured; if it is over budget the last
   structural step is halved and measured again.

Every measured candidate goes into the trace. Of those within the budget, the one returned
is the most faithful (lowest loss) among those within ``MIN_GAIN`` (5%) of the best by the
objective (``latency``: median wall time of the first calibration batches, the candidates that fit
re-timed round-robin at the end; ``size``: serialised bytes): a structural step that buys
only noise-level speed is not worth its fidelity. The ``max_seconds`` guard stops probing
early and keeps the final measurement.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from onnxpress.calibration import leading_batches
from onnxpress.errors import OnnxpressError
from onnxpress.fidelity import CONFIDENCE_Z, FidelityMeter
from onnxpress.model_io import model_nbytes
from onnxpress.pass_infra import PassReport, build_pass
from onnxpress.pipeline import CompileContext, Pipeline
from onnxpress.recipe import load_recipe
from onnxpress.runtime import make_session, run_batches, time_alternating

if TYPE_CHECKING:
    from collections.abc import Sequence

OBJECTIVES = ("latency", "size")
# Structural families per objective, in the order they are tried, with the largest strength probed.
# The first family accepted takes most of the budget (on MiniLM at --budget 0.02, --calib sotu, the
# second never fitted beside it). Heads first for latency: with encoders measured on window-filling
# samples, heads then FFN returned 12.5% of the heads + distill + int8 at 0.373x fp32's batch-8
# latency, FFN then heads 12.2% of the FFN + distill + int8 at 0.383x (in a second run int8 alone,
# 0.389x: the FFN step bought less than MIN_GAIN); measured on sentences, as now, both orders
# return 18.4% of the heads + distill + int8 (0.353x)
STRUCTURAL = {
    "latency": [("prune_heads", 0.5), ("prune_ffn", 0.6)],
    "size": [("lowrank", 0.5), ("prune_ffn", 0.6)],
}
# The last stage: quantisation settings per (model kind, objective). Decoders take the weight-only
# quantisation of a recipe (at decode faster and more faithful than dynamic int8,
# bench/results/decode.json), and the exact decoder fusions before it.
QUANTIZE = {("encoder", "latency"): {"mode": "static"}, ("encoder", "size"): {"mode": "static"}}
DECODER_RECIPES = {"latency": "balanced", "size": "edge-int4"}
PROBES_PER_FAMILY = 3
# Distillation after each structural probe: shorter than the pass's default, as every probe pays it.
PROBE_DISTILL = {"steps": 300, "max_minutes": 4.0}
# Calibration batches (of calibration.BATCH_SIZE samples) a structural probe fits on: fewer, faster probes.
PROBE_BATCHES = 8
FIRST_PROBE = 0.25  # of the family's largest strength
TIMING_REPEATS = 3
# Latency is timed on the first calibration batches (timing needs no held-out data), this many batches
# of calibration.BATCH_SIZE samples: window-filling text, as long as the calibration's, where the
# fidelity meters of an encoder take sentences
TIMING_BATCHES = 4
COMPRESSED = 0.99  # a candidate counts as compression when its file is below this share of the base's
# A lossier candidate is chosen over a more faithful one only when it beats it by more than
# this share of the objective: round-robin timings on a busy 2-core machine still drift by
# a few percent, and a structural step that buys noise-level speed still costs fidelity.
MIN_GAIN = 0.05


@dataclass
class SearchSettings:
    budget: float
    objective: str = "latency"
    max_seconds: float = 1800.0  # stop probing after this; the final measurement still runs
    families: list[str] | None = None  # structural families to try (default: by objective)
    probes_per_family: int = PROBES_PER_FAMILY
    distill: bool = True  # each structural probe is recovered by distillation (when there is text)

    def __post_init__(self) -> None:
        check_budget(self.budget, self.objective)


def check_budget(budget: Any, objective: Any) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not 0 < budget < 1:
        raise OnnxpressError(
            f"--budget {budget!r} must be a fidelity loss between 0 and 1, e.g. 0.01 (1% of cosine or perplexity)"
        )
    if objective not in OBJECTIVES:
        raise OnnxpressError(f"--objective {objective!r}: use latency or size")


def check_search_args(budget, objective, recipe, passes, calib, seconds: float = 1800.0) -> None:
    """Cheap checks before any model is loaded."""
    check_budget(budget, objective)
    if not seconds > 0:
        raise OnnxpressError(f"--search-seconds must be positive, not {seconds:g}: e.g. 1800")
    if recipe is not None or passes:
        raise OnnxpressError("--budget chooses the passes itself: drop --recipe / --passes")
    if not calib:
        raise OnnxpressError("--budget needs calibration data to search and measure on: add --calib sotu (or files)")


@dataclass
class Candidate:
    """One measured model of the search."""

    label: str
    steps: list[dict[str, Any]]  # [{"pass": name, "settings": {...}}] applied to the original model
    loss: float  # the larger of the domains' mean losses
    loss_bound: float  # the larger of the domains' mean + CONFIDENCE_Z standard errors
    latency_ms: float
    size_bytes: int  # its weights, wherever they are (a compile maps a large input's from a data file)
    fits: bool
    seconds: float
    compressed: bool  # smaller than the exact base (a lossy pass that kept everything float is not)
    # per measured domain ("calibration": its held-out split; "unseen": a domain it never saw): (loss, bound)
    domains: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SearchResult:
    model: ir.Model
    results: list[PassReport]
    chosen: Candidate
    trace: list[Candidate]
    settings: SearchSettings
    loss_definition: str
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.settings.budget,
            "objective": self.settings.objective,
            "loss": self.loss_definition,
            "chosen": self.chosen.label,
            "chosen_loss": self.chosen.loss,
            "chosen_loss_bound": self.chosen.loss_bound,
            "chosen_domains": self.chosen.domains,
            "fits": f"mean + {CONFIDENCE_Z:g} standard errors of the loss within the budget",
            "seconds": round(self.seconds, 1),
            "notes": self.notes,
            "trace": [c.to_dict() for c in self.trace],
        }


def timed_outputs(model: ir.Model, meter: FidelityMeter, timing: list, threads: int | None
                  ) -> tuple[list[dict[str, np.ndarray]], float]:
    """``model``'s outputs on the meter's batches and the median wall time in ms of
    ``TIMING_REPEATS`` runs of the ``timing`` batches (after one to warm up)."""
    session = make_session(model, threads=threads)
    outputs = run_batches(session, meter.batches, meter.outputs)
    run_batches(session, timing, meter.outputs)
    times = []
    for _ in range(TIMING_REPEATS):
        t0 = time.perf_counter()
        run_batches(session, timing, meter.outputs)
        times.append(time.perf_counter() - t0)
    return outputs, 1e3 * statistics.median(times)


def copy_model(model: ir.Model) -> ir.Model:
    """An independent copy to run passes on (graph cloned, weights shared until replaced)."""
    return model.clone()


class _Search:
    def __init__(self, model: ir.Model, ctx: CompileContext, settings: SearchSettings, kind: str, progress: bool):
        self.ctx, self.settings, self.kind, self.progress = ctx, settings, kind, progress
        self.start = time.perf_counter()
        self.meter = FidelityMeter.of_model(model, ctx.verification, kind=kind, threads=ctx.threads)
        self.unseen = FidelityMeter.of_model(model, ctx.unseen, kind=kind, threads=ctx.threads) if ctx.unseen else None
        self.timing = leading_batches(ctx.calibration.batches, TIMING_BATCHES)
        self.trace: list[Candidate] = []
        self.models: dict[int, tuple[ir.Model, list[PassReport]]] = {}
        self.notes: list[str] = []
        self.last_apply_seconds = 0.0
        self.base_size: int | None = None  # serialised size of the exact base (the first candidate)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def apply(self, model: ir.Model, results: list[PassReport], steps: Sequence[tuple[str, dict]]):
        """A copy of ``model`` with ``steps`` run on it (verified by the pass manager)."""
        model = copy_model(model)
        passes = [build_pass(name, settings) for name, settings in steps]
        c = self.ctx
        ctx = CompileContext(
            verification=c.verification, calibration=c.calibration, tokenizer_dir=c.tokenizer_dir,
            model_dir=c.model_dir, seed=c.seed,
            threads=c.threads, input_fidelity=self.meter, original=c.original, named_text=c.named_text,
            text_files=c.text_files, unseen=c.unseen, unseen_fidelity=self.unseen, precision=c.precision,
        )
        t0 = time.perf_counter()
        new = Pipeline(passes, verify=True, progress=False).run(model, ctx)
        self.last_apply_seconds += time.perf_counter() - t0
        return model, results + new

    def evaluate(self, label: str, model: ir.Model, results: list[PassReport]) -> Candidate:
        t0 = time.perf_counter()
        outputs, ms = timed_outputs(model, self.meter, self.timing, self.ctx.threads)
        domains = {"calibration": self.meter.measure(outputs)}
        if self.unseen is not None:
            unseen_outputs = run_batches(make_session(model, threads=self.ctx.threads), self.unseen.batches,
                                         self.unseen.outputs)
            domains["unseen"] = self.unseen.measure(unseen_outputs)
        loss = max(f.loss for f in domains.values())
        bound = max(f.loss_bound for f in domains.values())
        cand = Candidate(
            label=label,
            steps=[{"pass": r.name, "settings": _changed_settings(r)} for r in results],
            loss=loss,
            loss_bound=bound,
            latency_ms=round(ms, 2),
            size_bytes=model_nbytes(model),
            fits=bound <= self.settings.budget,
            seconds=round(time.perf_counter() - t0 + self.last_apply_seconds, 1),
            compressed=False,
            domains={k: [f.loss, f.loss_bound] for k, f in domains.items()},
        )
        self.last_apply_seconds = 0.0
        cand.compressed = self.base_size is not None and cand.size_bytes < COMPRESSED * self.base_size
        self.base_size = self.base_size or cand.size_bytes
        self.trace.append(cand)
        self.models[id(cand)] = (model, results)
        if self.progress:
            print(f"  search: {label}: loss {loss:.4g} (bound {bound:.4g}), {ms:.0f} ms, {cand.size_bytes / 1e6:.1f} MB"
                  f"{'' if cand.fits else ' (over budget)'}", flush=True)
        return cand

    def cost(self, cand: Candidate) -> float:
        return cand.latency_ms if self.settings.objective == "latency" else cand.size_bytes


@dataclass
class _Stage:
    """A model the structural steps build on: decomposed attention (distillation runs on it),
    its pass rows, and the (family, strength) steps taken to reach it."""

    model: ir.Model
    results: list[PassReport]
    steps: list[tuple[str, float]] = field(default_factory=list)


def search(model: ir.Model, ctx: CompileContext, settings: SearchSettings, *, kind: str = "encoder",
           progress: bool = False) -> SearchResult:
    """The best model within ``settings.budget``; see the module docstring."""
    if ctx.calibration is None:
        raise OnnxpressError("--budget needs calibration data to search and measure on: add --calib sotu (or files)")
    s = _Search(model, ctx, settings, kind, progress)
    budget = settings.budget
    has_attention = ctx.analysis(model).has_attention
    finish = [("attention", {"target": "onnxruntime"})] if has_attention else []  # exact, applied last
    if kind == "decoder":
        finish.append(("fuse", {}))
    if ctx.original is None:
        ctx.original = model.clone()  # distillation's teacher
    base = _Stage(*s.apply(model, [], [("cleanup", {})]))
    exact = s.evaluate("exact base (" + " + ".join(["cleanup", *(n for n, _ in finish)]) + ")",
                       *s.apply(base.model, base.results, finish))

    # 2. the last stage alone: its loss is what the structural families must leave room for.
    q_settings = _quantize_settings(kind, settings.objective)
    quant = s.evaluate("quantize " + _fmt(q_settings), *s.apply(base.model, base.results, [*finish, ("quantize", q_settings)]))
    if not quant.fits and q_settings.get("mode") != "weight_only":
        metric = "perplexity" if kind == "decoder" else "cosine"  # the search's own loss, where it can
        q_settings = {**q_settings, "budget": budget / 2, "budget_metric": metric}
        quant = s.evaluate("quantize " + _fmt(q_settings),
                           *s.apply(base.model, base.results, [*finish, ("quantize", q_settings)]))
    quant_loss = quant.loss if quant.fits else 0.0

    # 3. structural families (each recovered by distillation), from the stage the previous one accepted.
    distill = _distill_settings(s)
    stages = [base]
    families = [(f, hi) for f, hi in STRUCTURAL[settings.objective] if settings.families is None or f in settings.families]
    for family, top in families:
        if family.startswith("prune_") and not has_attention:
            s.notes.append(f"{family}: skipped, no transformer layers recognised")
            continue
        accepted = _probe_family(s, family, top, stages[-1], budget - quant_loss, distill, finish)
        if accepted is not None:
            stages.append(accepted)

    # 4. structural + quantize, backing off the last structural step while over budget.
    if quant.fits and len(stages) > 1:
        for _ in range(2):
            stage = stages[-1]
            label = " + ".join(f"{f} {v:g}" for f, v in stage.steps) + (" + distill" if distill else "") + " + quantize"
            combo = s.evaluate(label, *s.apply(stage.model, stage.results, [*finish, ("quantize", q_settings)]))
            if combo.fits or s.elapsed() > settings.max_seconds:
                break
            family, strength = stage.steps[-1]
            stages.pop()
            prev = stages[-1]
            halved = round(strength / 2, 3)
            stages.append(_Stage(*s.apply(prev.model, prev.results, _structural_steps(family, halved, distill)),
                                 [*prev.steps, (family, halved)]))

    fitting = [c for c in s.trace if c.fits and c.compressed]
    if not fitting:
        mildest = min((c for c in s.trace if c.compressed), key=lambda c: c.loss_bound, default=exact)
        raise OnnxpressError(
            f"no compression fits --budget {budget:g}: the mildest candidate ({mildest.label}) lost {mildest.loss:.3g} "
            f"(bound {mildest.loss_bound:.3g}); raise --budget to at least {mildest.loss_bound:.2g} or use --recipe lossless"
        )
    if settings.objective == "latency" and len(fitting) > 1:
        _time_together(s, fitting)
    chosen = _most_faithful_near_best(fitting, s.cost)
    chosen_model, chosen_results = s.models[id(chosen)]
    where = "the held-out calibration split" + (" and held-out samples of a domain the calibration never saw"
                                                 if s.unseen is not None else "")
    return SearchResult(chosen_model, chosen_results, chosen, s.trace, settings,
                        f"{s.meter.definition} on {where} (the larger of the two)" if s.unseen else
                        f"{s.meter.definition} on {where}", s.elapsed(), s.notes)


def _distill_settings(s: _Search) -> dict[str, Any] | None:
    """Distillation after each structural probe, or None (switched off, or no text to train on)."""
    if not s.settings.distill:
        return None
    if s.ctx.named_text is None and not s.ctx.text_files:
        s.notes.append("structural probes are not distilled: the calibration data holds no text to train on")
        return None
    return dict(PROBE_DISTILL)


def _structural_steps(family: str, strength: float, distill: dict | None) -> list[tuple[str, dict]]:
    return [(family, _strength_settings(family, strength)), *([("distill", distill)] if distill else [])]


def _most_faithful_near_best(candidates: list[Candidate], cost) -> Candidate:
    """The lowest-loss candidate whose cost is within ``MIN_GAIN`` of the best cost."""
    best = min(cost(c) for c in candidates)
    return min((c for c in candidates if cost(c) <= best * (1 + MIN_GAIN)), key=lambda c: c.loss)


def _time_together(s: _Search, candidates: list[Candidate]) -> None:
    """Re-time the candidates that fit, round-robin on the timing batches: each was timed
    alone when it was built, minutes apart, and other jobs on the machine can skew that
    more than the candidates differ."""
    runs = {}
    for i, cand in enumerate(candidates):
        session = make_session(s.models[id(cand)][0], threads=s.ctx.threads)
        runs[i] = lambda session=session: run_batches(session, s.timing, s.meter.outputs)
    medians = time_alternating(runs, repeats=TIMING_REPEATS, warmup=1)
    for i, cand in enumerate(candidates):
        cand.latency_ms = round(1e3 * medians[i], 2)
    s.notes.append(f"latency_ms of the {len(candidates)} candidates within the budget: timed round-robin at the end")


def _probe_family(s: _Search, family: str, top: float, stage: _Stage, room: float, distill: dict | None,
                  finish: list[tuple[str, dict]]) -> _Stage | None:
    """Secant search of ``family``'s strength on ``stage``: the stage the strongest probe whose loss
    bound fits ``room`` reaches (each probe measured with ``finish`` applied), or None."""
    lo, lo_loss = 0.0, 0.0  # strongest strength that fits (0: nothing yet) and its loss
    hi, hi_loss = None, None  # weakest strength that does not fit
    best = None
    strength = round(top * FIRST_PROBE, 3)
    for _ in range(s.settings.probes_per_family):
        if s.elapsed() > s.settings.max_seconds:
            s.notes.append(f"{family}: probing stopped at the {s.settings.max_seconds:.0f}s limit")
            break
        steps = _structural_steps(family, strength, distill)
        try:
            probe = _Stage(*s.apply(stage.model, stage.results, steps), [*stage.steps, (family, strength)])
            cand = s.evaluate(f"{family} {_fmt(steps[0][1])}" + (" + distill" if distill else ""),
                              *s.apply(probe.model, probe.results, finish))
        except OnnxpressError as exc:
            s.notes.append(f"{family} {_fmt(steps[0][1])}: {exc}")
            break
        if cand.loss_bound <= room:
            lo, lo_loss, best = strength, cand.loss_bound, probe
        else:
            hi, hi_loss = strength, cand.loss_bound
        nxt = _next_strength(lo, lo_loss, hi, hi_loss, room, top)
        if nxt is None or abs(nxt - strength) < 0.01 or (best and abs(nxt - lo) < 0.01):
            break
        strength = nxt
    return best


def _next_strength(lo, lo_loss, hi, hi_loss, room, top) -> float | None:
    """Interpolate loss ~ c * strength^p between the bracket ends (p = 2 with one end known)."""
    if hi is None:  # everything fitted so far: extrapolate upwards
        if lo_loss <= 0:
            return round(min(top, lo * 2), 3)
        return round(min(top, lo * math.sqrt(room / lo_loss)), 3)
    if lo == 0.0:
        guess = hi * math.sqrt(room / max(hi_loss, 1e-12))
    else:
        p = math.log(hi_loss / max(lo_loss, 1e-12)) / math.log(hi / lo) if hi_loss > lo_loss > 0 else 2.0
        guess = lo * (room / max(lo_loss, 1e-12)) ** (1 / max(p, 0.5))
    margin = 0.1 * (hi - lo)  # stay strictly inside the bracket
    guess = min(max(guess, lo + margin), hi - margin)
    return round(guess, 3) if guess > 0.005 else None


def _strength_settings(family: str, strength: float) -> dict[str, Any]:
    if family.startswith("prune_"):
        return {"fraction": strength, "max_batches": PROBE_BATCHES}
    if family == "lowrank":
        return {"fraction": strength, "max_batches": PROBE_BATCHES}
    raise OnnxpressError(f"the search has no strength for pass {family!r}: use prune_ffn, prune_heads or lowrank")


def _changed_settings(result: PassReport) -> dict[str, Any]:
    """A pass's settings that differ from its defaults (what a recipe would write)."""
    defaults = build_pass(result.name).config.to_dict()
    return {k: v for k, v in result.config.items() if defaults.get(k) != v}


def _quantize_settings(kind: str, objective: str) -> dict[str, Any]:
    if kind == "encoder":
        return dict(QUANTIZE[(kind, objective)])
    recipe = load_recipe(DECODER_RECIPES[objective])
    return next(dict(p.settings) for p in recipe.passes if p.name == "quantize" and p.applies_to(kind))


def _fmt(settings: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in settings.items() if k != "max_batches") or "defaults"
