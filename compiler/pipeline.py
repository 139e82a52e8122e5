"""Runs passes in order and checks every stage.

After each pass that changed the model, the manager serialises it, runs the ONNX
checker, loads it in a fresh ONNX Runtime session and re-measures its outputs
against the previous stage on the verification batch. The stage is accepted only
if that measured error is within what the pass reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_ir as ir
from tqdm.auto import tqdm

from onnxpress.errors import OnnxpressError
from onnxpress.fidelity import Fidelity, compare_outputs, primary_outputs
from onnxpress.model_io import model_proto
from onnxpress.pass_infra import Pass, PassReport
from onnxpress.runtime import make_session, run_batches

if TYPE_CHECKING:
    from onnxpress.analysis import TransformerMap
    from onnxpress.calibration import CalibrationSet

# Lossless passes must reproduce the previous stage to this relative error.
LOSSLESS_TOLERANCE = 1e-5
# Re-measured error may exceed the reported one by this relative slack (thread
# scheduling can reorder float reductions between two sessions).
REPORT_SLACK = 0.02


class VerificationError(OnnxpressError):
    """A pass produced a model that fails the checks after it (a bug in that pass)."""


@dataclass
class CompileContext:
    """What a pass may use besides the model: data, the reference outputs of the
    previous stage, and helpers to run and measure models."""

    verification: list[dict[str, np.ndarray]]
    calibration: CalibrationSet | None = None
    tokenizer_dir: Path | None = None
    seed: int = 0
    threads: int | None = None
    reference: list[dict[str, np.ndarray]] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    # the compile's input model, as it was before the first pass (distillation's teacher)
    original: ir.Model | None = None
    # the text files the calibration data was read from (None: an .npz or synthetic data)
    text_files: list[Path] | None = None
    _analysis: tuple[ir.Model, TransformerMap] | None = field(default=None, repr=False)

    def run(self, model: ir.Model, batches=None, outputs: Sequence[str] | None = None):
        session = make_session(model, threads=self.threads)
        return run_batches(session, self.verification if batches is None else batches, outputs or self.output_names)

    def measure(self, model: ir.Model) -> Fidelity:
        """How far ``model``'s outputs are from the previous stage's on the verification batch."""
        return compare_outputs(self.reference, self.run(model))

    def analysis(self, model: ir.Model) -> TransformerMap:
        """The analysis map of ``model``, computed once until a pass changes the model."""
        from onnxpress.analysis import analyze

        if self._analysis is None or self._analysis[0] is not model:
            self._analysis = (model, analyze(model))
        return self._analysis[1]

    def forget_analysis(self) -> None:
        """Drop the cached map (the model was rewritten)."""
        self._analysis = None

    def calibration_batches(self, pass_name: str, max_batches: int | None = None) -> list[dict[str, np.ndarray]]:
        """The calibration batches a pass fits on (the first ``max_batches``; 0 or None: all)."""
        batches = list(self.require_calibration(pass_name).batches)
        return batches[:max_batches] if max_batches else batches

    def require_calibration(self, pass_name: str) -> CalibrationSet:
        if self.calibration is None:
            raise OnnxpressError(
                f"{pass_name} needs calibration data: pass --calib TEXT_FILES_OR_FOLDER (with --tokenizer DIR) or --calib data.npz"
            )
        return self.calibration


class Pipeline:
    def __init__(self, passes: Sequence[Pass], *, verify: bool = True, progress: bool = True):
        self.passes = list(passes)
        self.verify = verify
        self.progress = progress

    def check_applicable(self, model: ir.Model, model_name: str = "model") -> None:
        """Fail early, naming every pass that cannot apply to a model without attention."""
        needs = [p.name for p in self.passes if p.needs_attention]
        if not needs:
            return
        from onnxpress.analysis import analyze

        tmap = analyze(model)
        if not tmap.has_attention:
            why = f" ({tmap.unrecognised[0]})" if tmap.unrecognised else ""
            raise OnnxpressError(
                f"{model_name}: no transformer attention recognised{why}; passes {', '.join(needs)} "
                "cannot apply: remove them (e.g. --passes cleanup) or check the model is a transformer export"
            )

    def run(self, model: ir.Model, ctx: CompileContext) -> list[PassReport]:
        """Run all passes on ``model`` in place; returns one result per pass."""
        ctx.output_names = ctx.output_names or primary_outputs(model)
        if not ctx.reference:
            ctx.reference = ctx.run(model)
        if ctx.original is None and any(p.needs_original for p in self.passes):
            ctx.original = model.clone()
        results = []
        bar = tqdm(self.passes, desc="passes", unit="pass", disable=not self.progress)
        for p in bar:
            bar.set_postfix_str(p.name)
            result = p.run(model, ctx)
            if result.modified and self.verify:
                ctx.reference = self._check_stage(model, ctx, result, lossless=p.lossless)
            results.append(result)
        return results

    def _check_stage(self, model: ir.Model, ctx: CompileContext, result: PassReport, *, lossless: bool):
        proto = model_proto(model)
        try:
            onnx.checker.check_model(proto)
        except onnx.checker.ValidationError as exc:
            first = str(exc).strip().splitlines()[0]
            raise VerificationError(f"pass {result.name} wrote an invalid ONNX model ({first}): please report this bug") from None
        outputs = run_batches(make_session(proto.SerializeToString(), threads=ctx.threads), ctx.verification, ctx.output_names)
        measured = compare_outputs(ctx.reference, outputs).rel_l2
        result.measured_error = measured
        allowed = LOSSLESS_TOLERANCE if lossless else result.error * (1 + REPORT_SLACK) + 1e-6
        if measured > allowed:
            raise VerificationError(
                f"pass {result.name}: the saved model is {measured:.3g} (relative L2) from the previous stage, "
                f"more than the {allowed:.3g} it may be: please report this bug; run without this pass meanwhile"
            )
        return outputs
