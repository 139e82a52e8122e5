"""The pass manager: runs passes in order on one model and verifies every stage.

After each pass that changed the model, the manager serialises it, runs the ONNX
checker, loads it in a fresh ONNX Runtime session and re-measures its outputs
against the previous stage on the verification batches. The stage is accepted only
if that measured error is within what the pass reported plus the rounding of the model's
precision (lossless passes: within the precision's tolerance, ``onnxpress.precision``;
float32: 1e-5); anything else, an ONNX Runtime failure included, is a
one-line ``VerificationError`` that names the pass. Each stage is also measured
end to end against the compile's input model (``onnxpress.fidelity.FidelityMeter``)
from the same outputs, for the report.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_ir as ir
from tqdm.auto import tqdm

from onnxpress.analysis.graph_utils import split_if
from onnxpress.calibration import leading_batches, replaceable_ids, with_replaced_tokens
from onnxpress.datasets import load_tokenizer
from onnxpress.errors import OnnxpressError, first_line
from onnxpress.fidelity import Fidelity, FidelityMeter, compare_outputs, model_kind, primary_outputs
from onnxpress.memory import PeakRss, memory_shortfall
from onnxpress.model_io import SessionModel, mapped_nbytes, model_nbytes, session_model
from onnxpress.output_store import OutputStore
from onnxpress.pass_infra import Pass, PassReport
from onnxpress.precision import Precision, model_precision
from onnxpress.runtime import iter_batches, make_session, session_options

if TYPE_CHECKING:
    from onnxpress.analysis import TransformerMap
    from onnxpress.calibration import CalibrationSet

# Re-measured error may exceed the reported one by this relative slack, plus the
# precision's rounding (thread scheduling can reorder float reductions between two sessions).
REPORT_SLACK = 0.02
# What every verification failure tells the user to do: it is a bug in the pass, not in their input.
REPORT_BUG = "please report this bug; run without this pass meanwhile"
# make_session's one-line prefix when ONNX Runtime itself rejects the model.
_ORT_LOAD_FAILURE = "ONNX Runtime cannot load the model: "


class VerificationError(OnnxpressError):
    """A pass produced a model that fails the checks after it (a bug in that pass)."""


@dataclass
class CompileContext:
    """What a pass may use besides the model: data, the reference outputs of the
    previous stage, the compile's input model, and helpers to run and measure models."""

    verification: list[dict[str, np.ndarray]]
    calibration: CalibrationSet | None = None
    tokenizer_dir: Path | None = None
    # the input model's folder (its config.json: what the graph does not record, e.g. the context length)
    model_dir: Path | None = None
    seed: int = 0
    threads: int | None = None
    # the compile input's compute precision: the size of the rounding the checks allow (None: the
    # precision of the model the first Pipeline.run gets)
    precision: Precision | None = None
    # the previous stage's outputs on the verification batches (an OutputStore: a decoder's logits
    # spill to disk past a memory allowance)
    reference: Sequence[dict[str, np.ndarray]] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    # the compile's input model, as it was before the first pass (distillation's teacher)
    original: ir.Model | None = None
    # the text the calibration data was read from: named shared data ("sotu", "bbc", "default"),
    # or the user's text files (both None: an .npz or synthetic data)
    named_text: str | None = None
    text_files: list[Path] | None = None
    # held-out samples of a domain the calibration never saw, measured like the verification ones
    unseen: list[dict[str, np.ndarray]] = field(default_factory=list)
    unseen_source: str = ""
    unseen_fidelity: FidelityMeter | None = None
    # measures a stage's outputs against the compile's input model; set by the first Pipeline.run
    input_fidelity: FidelityMeter | None = None
    _analysis: tuple[ir.Model, TransformerMap] | None = field(default=None, repr=False)
    # the outputs ``measure_stage`` last computed: the next reference when stages are not verified
    stage_outputs: Sequence[dict[str, np.ndarray]] = field(default_factory=list, repr=False)
    _replaceable: np.ndarray | None = field(default=None, repr=False)

    def run(self, model: ir.Model, batches=None, outputs: Sequence[str] | None = None) -> list[dict[str, np.ndarray]]:
        return list(self.stream(model, batches, outputs))

    def stream(self, model: ir.Model, batches=None, outputs: Sequence[str] | None = None
               ) -> Iterator[dict[str, np.ndarray]]:
        """``run``, one batch at a time as they are read (the session is made now)."""
        session = make_session(model, threads=self.threads)
        return iter_batches(session, self.verification if batches is None else batches, outputs or self.output_names)

    def measure(self, model: ir.Model) -> Fidelity:
        """How far ``model``'s outputs are from the previous stage's on the verification batch."""
        return compare_outputs(self.reference, self.stream(model))

    def measure_stage(self, model: ir.Model, pass_name: str) -> Fidelity:
        """``measure`` for the model ``pass_name`` just wrote: a failure to run it is a
        ``VerificationError`` naming the pass."""
        self.stage_outputs = self.run_stage(model, pass_name)
        return self.compare_stage(self.stage_outputs, pass_name)

    def run_stage(self, model: ir.Model | SessionModel, pass_name: str) -> OutputStore:
        """The verification outputs of the model ``pass_name`` wrote, in a fresh session."""
        options = session_options(self.threads)
        options.log_severity_level = 4  # ORT's own error log would add lines to the one-line error below
        try:
            session = make_session(model, options=options)
        except OnnxpressError as exc:
            if not str(exc).startswith(_ORT_LOAD_FAILURE):
                raise  # not the model's fault (e.g. the operator library is not built)
            detail = str(exc).removeprefix(_ORT_LOAD_FAILURE)
            raise VerificationError(
                f"pass {pass_name} wrote a model ONNX Runtime cannot load ({detail}): {REPORT_BUG}"
            ) from None
        try:
            return OutputStore.of(iter_batches(session, self.verification, self.output_names))
        except MemoryError:
            raise
        except Exception as exc:  # ORT raises several types; the same feeds ran the previous stage
            raise VerificationError(
                f"pass {pass_name} wrote a model ONNX Runtime cannot run ({first_line(exc)}): {REPORT_BUG}"
            ) from None

    def compare_stage(self, outputs: Sequence[dict[str, np.ndarray]], pass_name: str) -> Fidelity:
        """``outputs`` against the previous stage's."""
        try:
            return compare_outputs(self.reference, outputs)
        except ValueError:
            raise VerificationError(
                f"pass {pass_name} changed the shape or type of every output it is compared on: {REPORT_BUG}"
            ) from None

    def analysis(self, model: ir.Model) -> TransformerMap:
        """The analysis map of ``model``, computed once until a pass changes the model."""
        from onnxpress.analysis import analyze

        if self._analysis is None or self._analysis[0] is not model:
            self._analysis = (model, analyze(model))
        return self._analysis[1]

    def forget_analysis(self) -> None:
        """Drop the cached map (the model was rewritten)."""
        self._analysis = None

    def calibration_batches(self, pass_name: str, max_batches: int | None = None, *, augment: float = 0.0
                            ) -> list[dict[str, np.ndarray]]:
        """The calibration batches a pass fits on (those holding the first ``max_batches`` batches' worth
        of samples, ``calibration.leading_batches``; 0 or None: all), with ``augment`` of their real
        tokens replaced by random vocabulary ones where the compile has a tokenizer
        (:meth:`replaceable_tokens`); every call with the same arguments returns the same."""
        batches = list(self.require_calibration(pass_name).batches)
        batches = leading_batches(batches, max_batches)
        replaceable = self.replaceable_tokens() if augment else None
        return batches if replaceable is None else with_replaced_tokens(batches, augment, replaceable, self.seed)

    def replaceable_tokens(self) -> np.ndarray | None:
        """The token ids augmentation substitutes: the tokenizer's vocabulary but its special
        tokens (None without a tokenizer, e.g. for npz or synthetic calibration)."""
        if self.tokenizer_dir is None:
            return None
        if self._replaceable is None:
            self._replaceable = replaceable_ids(load_tokenizer(self.tokenizer_dir))
        return self._replaceable

    def require_calibration(self, pass_name: str) -> CalibrationSet:
        if self.calibration is None:
            raise OnnxpressError(
                f"{pass_name} needs calibration data: pass --calib TEXT_FILES_OR_FOLDER (with --tokenizer DIR) or --calib data.npz"
            )
        return self.calibration


class Pipeline:
    """The pass manager: runs a list of passes in order on one model, in place, and
    verifies each stage (see the module docstring); ``run`` returns one ``PassReport``
    per pass, the rows of the compile report."""

    def __init__(self, passes: Sequence[Pass], *, verify: bool = True, progress: bool = True):
        self.passes = list(passes)
        self.verify = verify
        self.progress = progress

    def check_applicable(self, model: ir.Model, ctx: CompileContext, model_name: str = "model") -> None:
        """Fail early, naming every pass that cannot apply: to a model without attention, or to a
        graph split into a prompt and a decode branch (by ``prefill_path``, in the model or earlier
        in the list), which the other passes would rewrite one branch of."""
        split = split_if(model.graph) is not None
        for i, p in enumerate(self.passes):
            if p.splits_graph:
                continue
            if split:
                raise OnnxpressError(f"{p.name}: {model_name} is split into prompt and decode branches "
                                     "(prefill_path), which no pass may follow: compile the model it was made from")
            if any(q.splits_graph for q in self.passes[:i]):
                raise OnnxpressError(f"{p.name}: comes after prefill_path, which no pass may follow: "
                                     "put prefill_path last")
        needs = [p.name for p in self.passes if p.needs_attention]
        if not needs:
            return
        tmap = ctx.analysis(model)
        if not tmap.has_attention:
            why = f" ({tmap.unrecognised[0]})" if tmap.unrecognised else ""
            raise OnnxpressError(
                f"{model_name}: no transformer attention recognised{why}; passes {', '.join(needs)} "
                "cannot apply: remove them (e.g. --passes cleanup) or check the model is a transformer export"
            )

    def run(self, model: ir.Model, ctx: CompileContext) -> list[PassReport]:
        """Run all passes on ``model`` in place; returns one result per pass, each with its stage
        measured against the compile's input model (a pass that changed nothing carries the
        stage before it)."""
        ctx.output_names = ctx.output_names or primary_outputs(model)
        if ctx.precision is None:
            ctx.precision = model_precision(model)
        if not ctx.reference:
            ctx.reference = OutputStore.of(ctx.stream(model))
        if ctx.input_fidelity is None:
            ctx.input_fidelity = FidelityMeter(ctx.reference, ctx.verification, model_kind(model), ctx.output_names)
        if ctx.unseen and ctx.unseen_fidelity is None:
            ctx.unseen_fidelity = FidelityMeter.of_model(model, ctx.unseen, threads=ctx.threads)
        if ctx.original is None and any(p.needs_original for p in self.passes):
            ctx.original = model.clone()
        results = []
        vs_input = vs_unseen = None  # the current stage's fidelity against the input model
        bar = tqdm(self.passes, desc="passes", unit="pass", disable=not self.progress)
        for p in bar:
            bar.set_postfix_str(p.name)
            mapped = mapped_nbytes(model)
            shortfall = memory_shortfall(p.name, model_nbytes(model) - mapped, p.memory_multiple,
                                         mapped, p.mapped_memory_multiple, p.working_memory(model))
            if shortfall:
                print(f"onnxpress: warning: {shortfall}", file=sys.stderr, flush=True)
            with PeakRss() as peak:
                result = p.run(model, ctx)
                if result.modified:
                    if self.verify:  # the check runs the stage again: one copy of its outputs held, not two
                        ctx.stage_outputs = []
                        ctx.reference = self._check_stage(model, ctx, result, lossless=p.lossless)
                    else:
                        ctx.reference = ctx.stage_outputs  # the next stage is compared with this one
                    ctx.stage_outputs = []
                    vs_input = None
            result.peak_rss_mb = peak.mb
            if shortfall:
                result.details["memory_warning"] = shortfall
            if vs_input is None:
                vs_input = self._vs_input(ctx, p.name)
                vs_unseen = self._vs_unseen(model, ctx)
            result.vs_input, result.vs_unseen = vs_input, vs_unseen
            results.append(result)
        return results

    @staticmethod
    def _vs_input(ctx: CompileContext, pass_name: str) -> dict:
        """The current stage (``ctx.reference``) against the compile's input model."""
        try:
            return ctx.input_fidelity.measure(ctx.reference).to_dict()
        except (KeyError, ValueError):
            raise VerificationError(
                f"pass {pass_name} changed the shape of the outputs compared with the input model: {REPORT_BUG}"
            ) from None

    @staticmethod
    def _vs_unseen(model: ir.Model, ctx: CompileContext) -> dict:
        """The current stage against the input model on the unseen domain's samples ({}: none)."""
        meter = ctx.unseen_fidelity
        if meter is None:
            return {}
        return meter.measure(ctx.stream(model, meter.batches, meter.outputs)).to_dict()

    def _check_stage(self, model: ir.Model, ctx: CompileContext, result: PassReport, *, lossless: bool):
        """The checker, a fresh ORT session of the saved model, and its error against the
        reported one; returns the stage's verification outputs."""
        source = session_model(model)
        try:
            source.check()
        except onnx.checker.ValidationError as exc:
            raise VerificationError(
                f"pass {result.name} wrote an invalid ONNX model ({first_line(exc)}): {REPORT_BUG}"
            ) from None
        outputs = ctx.run_stage(source, result.name)
        measured = ctx.compare_stage(outputs, result.name).rel_l2
        result.measured_error = measured
        precision = ctx.precision
        if lossless and measured > precision.lossless_tolerance:
            raise VerificationError(
                f"pass {result.name} is lossless, but the saved model is {measured:.3g} (relative L2) from the "
                f"previous stage, more than the {precision.lossless_tolerance:g} allowed in {precision.name}: "
                f"{REPORT_BUG}"
            )
        allowed = result.error * (1 + REPORT_SLACK) + precision.rounding_slack
        if not lossless and measured > allowed:
            raise VerificationError(
                f"pass {result.name} reported an error of {result.error:.3g} (relative L2), but the saved model is "
                f"{measured:.3g} from the previous stage: {REPORT_BUG}"
            )
        return outputs
