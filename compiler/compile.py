"""``compile_model``: the Python API behind ``onnxpress compile``.

Validates everything cheap first (output name, pass names and settings, calibration
inputs) so bad input fails in a second with one line, then runs the passes and
writes the model and ``<output>.report.json`` only when every stage passed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import onnx_ir as ir

from onnxpress.datasets import TOKENIZER_FILES, describe_split, find_tokenizer_dir, sotu_files
from onnxpress.errors import OnnxpressError
from onnxpress.model_io import load_model, save_model
from onnxpress.pass_infra import build_pass, get_pass
from onnxpress.pipeline import CompileContext, Pipeline
from onnxpress.recipe import PassSpec, Recipe, load_recipe, parse_pass_args
from onnxpress.report import CompileReport

DEFAULT_RECIPE = "balanced"
# What runs when neither a recipe nor calibration data is given: `balanced` needs calibration.
NO_CALIBRATION_RECIPE = "lossless"
# `--calib sotu`: the calibration split of the shared SOTU speeches (disjoint from evaluation).
NAMED_CALIBRATION = "sotu"
DEFAULT_MAX_SAMPLES = 256
# Samples held back from the calibration data to verify each stage.
VERIFY_FRACTION = 0.15


def report_path(output: str | os.PathLike) -> Path:
    return Path(output).with_suffix(".report.json")


def resolve_recipe(
    recipe: str | os.PathLike | None, passes: Sequence[str] | None, *, has_calibration: bool = True
) -> Recipe:
    if recipe is not None and passes:
        raise OnnxpressError("give either --recipe or --passes, not both")
    if passes:
        return parse_pass_args(list(passes))
    if recipe is None and not has_calibration:
        return load_recipe(NO_CALIBRATION_RECIPE)
    return load_recipe(recipe or DEFAULT_RECIPE)


def model_kind(model: ir.Model) -> str:
    """'decoder' when the model emits logits (a language model), else 'encoder'."""
    return "decoder" if any(v.name == "logits" for v in model.graph.outputs) else "encoder"


def select_passes(plan: Recipe, model: ir.Model, *, has_calibration: bool) -> tuple[list[PassSpec], list[str]]:
    """The recipe's passes that run on ``model``, and a note for each optional one skipped."""
    kind = model_kind(model)
    specs = [s for s in plan.passes if s.applies_to(kind)]
    notes: list[str] = []
    if any(s.optional and get_pass(s.name).needs_attention for s in specs):
        from onnxpress.analysis import analyze

        if not analyze(model).has_attention:
            skipped = [s for s in specs if s.optional and get_pass(s.name).needs_attention]
            notes += [f"skipped optional pass {s.name}: no transformer attention recognised" for s in skipped]
            specs = [s for s in specs if s not in skipped]
    if not has_calibration:
        skipped = [s for s in specs if s.optional and get_pass(s.name).needs_calibration]
        notes += [f"skipped optional pass {s.name}: it needs calibration data (--calib)" for s in skipped]
        specs = [s for s in specs if s not in skipped]
    if not specs:
        raise OnnxpressError(f"recipe {plan.name}: no pass applies to this {kind} model: choose another recipe")
    return specs, notes


def load_calibration(
    calib: Sequence[str | os.PathLike] | None,
    model,
    tokenizer_dir: Path | None,
    *,
    max_samples: int | None,
    max_length: int,
    batch_size: int,
    seed: int,
):
    from onnxpress.calibration import CalibrationSet

    if not calib:
        return None
    paths = [Path(p) for p in calib]
    if len(paths) == 1 and paths[0].suffix == ".npz":
        return CalibrationSet.from_npz(paths[0], model)
    source = None
    if [str(p) for p in paths] == [NAMED_CALIBRATION] and not paths[0].exists():
        paths, source = sotu_files("calibration"), describe_split("calibration")
    if tokenizer_dir is None:
        raise OnnxpressError("text calibration needs a tokenizer: pass --tokenizer DIR (the exported model's folder)")
    return CalibrationSet.from_files(
        paths, tokenizer_dir, model, max_length=max_length, batch_size=batch_size, max_samples=max_samples,
        seed=seed, **({"source": source} if source else {}),
    )


def compile_model(
    model: str | os.PathLike,
    output: str | os.PathLike,
    *,
    recipe: str | os.PathLike | None = None,
    passes: Sequence[str] | None = None,
    calib: Sequence[str | os.PathLike] | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    max_samples: int | None = None,
    max_length: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    threads: int | None = None,
    verify: bool = True,
    external_data: bool | None = None,
    progress: bool = True,
    budget: float | None = None,
    objective: str = "latency",
    search_seconds: float = 540.0,
) -> CompileReport:
    """Compile ``model`` with a recipe, a pass list, or (``budget``) the automatic search.

    ``budget``: the largest fidelity loss allowed on the held-out calibration split
    (see ``onnxpress.auto_search``); ``objective``: what the search minimises,
    ``latency`` or ``size``; ``search_seconds``: wall time after which the search stops
    probing (the final measurement still runs).
    """
    from onnxpress.calibration import CalibrationSet

    start = time.perf_counter()
    src, out = Path(model), Path(output)
    if out.suffix != ".onnx":
        raise OnnxpressError(f"output {out} must end in .onnx: choose a name like model.compressed.onnx")
    if budget is not None:
        from onnxpress.auto_search import check_search_args

        check_search_args(budget, objective, recipe, passes, calib)
        plan = Recipe(name=f"auto (budget {budget:g}, objective {objective})", passes=[])
    else:
        plan = resolve_recipe(recipe, passes, has_calibration=bool(calib))
        for spec in plan.passes:  # validate every setting before any slow work
            build_pass(spec.name, spec.settings)

    ir_model = load_model(src)
    notes: list[str] = []
    if recipe is None and not passes and not calib and budget is None:
        notes.append(f"no --calib given: ran the {NO_CALIBRATION_RECIPE} recipe instead of {DEFAULT_RECIPE}")
    specs: list[PassSpec] = []
    if budget is None:
        specs, skipped = select_passes(plan, ir_model, has_calibration=bool(calib))
        notes += skipped
    pass_objs = [build_pass(spec.name, spec.settings) for spec in specs]
    manager = Pipeline(pass_objs, verify=verify, progress=progress)
    manager.check_applicable(ir_model, src.name)
    tok_dir = _tokenizer_dir(src, tokenizer_dir)
    calibration = load_calibration(
        calib,
        ir_model,
        tok_dir,
        max_samples=max_samples or plan.calibration.get("max_samples", DEFAULT_MAX_SAMPLES),
        max_length=max_length or plan.calibration.get("max_length", 128),
        batch_size=batch_size,
        seed=seed,
    )
    needy = [p.name for p in pass_objs if p.needs_calibration]
    if needy and calibration is None:
        raise OnnxpressError(
            f"passes {', '.join(needy)} need calibration data: pass --calib TEXT_FILES_OR_FOLDER "
            "(tokenizer from the model's folder or --tokenizer) or --calib inputs.npz"
        )
    if calibration is not None and len(calibration) >= 4:
        calibration, held_out = calibration.split(VERIFY_FRACTION)
        verification = held_out.batches
    elif calibration is not None:
        verification = calibration.batches[:1]
    else:
        verification = CalibrationSet.synthetic(ir_model, seed=seed).batches
    ctx = CompileContext(
        verification=verification, calibration=calibration, tokenizer_dir=tok_dir, seed=seed, threads=threads
    )
    extra: dict = {}
    if budget is not None:
        from onnxpress.auto_search import SearchSettings, search

        found = search(ir_model, ctx, SearchSettings(budget=budget, objective=objective, max_seconds=search_seconds), kind=model_kind(ir_model),
                       progress=progress)
        ir_model, results = found.model, found.results
        extra["search"] = found.to_dict()
    else:
        results = manager.run(ir_model, ctx)
    if notes:
        extra["notes"] = notes

    save_model(ir_model, out, external_data=external_data)
    report = CompileReport(
        model=str(src),
        output=str(out),
        recipe=plan.name,
        calibration=calibration.source if calibration is not None else "synthetic tokens (no --calib given)",
        passes=results,
        size_before=_file_size(src),
        size_after=_file_size(out),
        seconds=time.perf_counter() - start,
        extra=extra,
    )
    try:
        report.write_json(report_path(out))
    except BaseException:
        out.unlink(missing_ok=True)  # no model without its report
        raise
    return report


def _tokenizer_dir(model_path: Path, tokenizer_dir) -> Path | None:
    """The tokenizer folder when one is given or sits beside the model (only text calibration needs it)."""
    if tokenizer_dir is not None:
        return find_tokenizer_dir(model_path, tokenizer_dir)
    folder = model_path.parent
    return folder if any((folder / f).exists() for f in TOKENIZER_FILES) else None


def _file_size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)
