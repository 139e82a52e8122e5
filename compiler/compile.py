"""``compile_model``: the Python API behind ``onnxpress compile``.

Validates everything cheap first (output name, pass names and settings, calibration
inputs) so bad input fails in a second with one line, then runs the passes and
writes the model and ``<output>.report.json`` only when every stage passed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import onnx_ir as ir

from onnxpress import datasets
from onnxpress.calibration import BATCH_SIZE, is_past_input
from onnxpress.datasets import TOKENIZER_FILES, find_tokenizer_dir
from onnxpress.editing import weights_spilled_to
from onnxpress.errors import OnnxpressError
from onnxpress.fidelity import model_kind
from onnxpress.memory import fix_mmap_threshold, process_peak_mb, release_freed_memory
from onnxpress.model_io import compile_input, files_size, move_into_place, output_folder, save_model
from onnxpress.pass_infra import build_pass, get_pass
from onnxpress.pipeline import CompileContext, Pipeline
from onnxpress.precision import model_precision
from onnxpress.recipe import PassSpec, Recipe, load_recipe, parse_pass_args
from onnxpress.report import CompileReport
from onnxpress.runtime_files import RuntimeFiles, plan_runtime_files, save_files

DEFAULT_RECIPE = "balanced"
# What runs when neither a recipe nor calibration data is given: `balanced` needs calibration.
NO_CALIBRATION_RECIPE = "lossless"
DEFAULT_MAX_SAMPLES = 256
LOGITS_BATCH_BYTES = 32 * 2**20
# Samples held back from the calibration data to verify each stage.
VERIFY_FRACTION = 0.15


def default_batch_size(model: ir.Model, max_length: int) -> int:
    """``BATCH_SIZE`` samples a batch; fewer for a decoder whose logits over that many samples of
    ``max_length`` tokens would pass ``LOGITS_BATCH_BYTES``: a large vocabulary's logits are most of
    what a compile's sessions allocate beyond the weights (SmolLM2's 49,152 at 8 x 128 tokens: 201 MB
    a batch, held by the session, the stored reference and the comparison; it gets batches of 1)."""
    logits = next((v for v in model.graph.outputs if v.name == "logits"), None)
    vocab = logits.shape[-1] if logits is not None and logits.shape is not None and len(logits.shape) else None
    if not isinstance(vocab, int):
        return BATCH_SIZE
    return max(1, min(BATCH_SIZE, LOGITS_BATCH_BYTES // (max_length * vocab * 4)))


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


def select_passes(
    plan: Recipe, model: ir.Model, *, has_calibration: bool, ctx: CompileContext | None = None
) -> tuple[list[PassSpec], list[str]]:
    """The recipe's passes that run on ``model``, and a note for each optional one skipped
    (``ctx``: the compile's context, whose cached analysis of ``model`` is used)."""
    kind = model_kind(model)
    specs = [s for s in plan.passes if s.applies_to(kind)]
    notes: list[str] = []
    if any(s.optional and get_pass(s.name).needs_attention for s in specs):
        ctx = ctx or CompileContext(verification=[])
        if not ctx.analysis(model).has_attention:
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
    """The calibration set ``--calib`` names: one .npz, text files or folders, or named data
    (``sotu``, ``bbc``, ``default``: the calibration splits of the shared corpora)."""
    from onnxpress.calibration import CalibrationSet

    if not calib:
        return None
    paths = [Path(p) for p in calib]
    if len(paths) == 1 and paths[0].suffix == ".npz":
        return CalibrationSet.from_npz(paths[0], model, batch_size=batch_size)
    if tokenizer_dir is None:
        raise OnnxpressError("text calibration needs a tokenizer: pass --tokenizer DIR (the exported model's folder)")
    options = dict(max_length=max_length, batch_size=batch_size, max_samples=max_samples, seed=seed)
    named = named_data(calib)
    if named is not None:
        texts, source = datasets.named_texts(named, "calibration", 4 * max_length)
        return CalibrationSet.from_texts(texts, tokenizer_dir, model, source=source, **options)
    return CalibrationSet.from_files(paths, tokenizer_dir, model, **options)


def named_data(calib: Sequence[str | os.PathLike] | None) -> str | None:
    """The name of the shared data ``--calib`` asks for (a name that is not a path), else None."""
    if calib and len(calib) == 1 and str(calib[0]) in datasets.NAMED_CALIBRATIONS and not Path(calib[0]).exists():
        return str(calib[0])
    return None


def unseen_domain_batches(named: str | None, model, tokenizer_dir: Path | None, samples: int, *, max_length: int,
                          batch_size: int, seed: int):
    """Held-out samples of the corpus a named calibration never drew from (its calibration split,
    disjoint from every evaluation split; an encoder's: their sentences, see ``measured_part``), or
    None: every stage is also measured on them."""
    from onnxpress.calibration import CalibrationSet

    corpus = datasets.unseen_corpus(named) if named is not None else None
    if corpus is None or tokenizer_dir is None or samples < 1:
        return None
    texts, source = datasets.named_texts(corpus, "calibration", 4 * max_length)
    unseen = CalibrationSet.from_texts(texts, tokenizer_dir, model, max_length=max_length, batch_size=batch_size,
                                       max_samples=samples, seed=seed, source=source)
    measured = measured_part(unseen, model, tokenizer_dir, max_length=max_length, batch_size=batch_size, seed=seed)
    measured.source = f"{_counted(measured, unseen, 'samples')} of the {source}"
    return measured


def measured_part(held_out, model: ir.Model, tokenizer_dir: Path | None, *, max_length: int, batch_size: int,
                  seed: int):
    """What held-out text is measured on: an encoder's on the sentences of the held-out samples,
    which is what a sentence-embedding model embeds and what ``onnxpress eval`` and the recipes'
    descriptions measure (MiniLM with 12.5% of its heads pruned and distilled, then int8: a loss of
    0.016 on 38 window-filling BBC News samples, 0.011 on 256 BBC News evaluation sentences); a
    decoder's on the samples themselves, which fill its window."""
    if model_kind(model) != "encoder" or tokenizer_dir is None:
        return held_out
    found = held_out.sentences(tokenizer_dir, model, max_length=max_length, batch_size=batch_size, seed=seed)
    return held_out if found is None else found


def _counted(measured, held_out, noun: str) -> str:
    if measured is held_out:
        return f"{held_out.num_samples} {noun}"
    return f"{measured.num_samples} sentences of {held_out.num_samples} {noun}"


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
    batch_size: int | None = None,
    seed: int = 0,
    threads: int | None = None,
    verify: bool = True,
    external_data: bool | None = None,
    progress: bool = True,
    budget: float | None = None,
    objective: str = "latency",
    search_seconds: float = 1800.0,
) -> CompileReport:
    """Compile ``model`` with a recipe, a pass list, or (``budget``) the automatic search.

    ``budget``: the largest fidelity loss allowed on the held-out calibration split
    (see ``onnxpress.auto_search``); ``objective``: what the search minimises,
    ``latency`` or ``size``; ``search_seconds``: wall time after which the search stops
    probing (the final measurement still runs). Blocks of 4 MB or more that the process allocates
    from then on get their own mappings (``memory.fix_mmap_threshold``).
    """
    start = time.perf_counter()
    fix_mmap_threshold()
    src, out = Path(model), Path(output)
    plan, notes = _check_arguments(out, recipe, passes, calib, budget, objective, search_seconds)
    # weights mapped from a data file (an inline model's moved to one) stay on disk, and the weights
    # the passes make for them go to disk as they are made, until saved
    with compile_input(src, out.parent) as given, weights_spilled_to(given.spill):
        ir_model, size_before = given.model, given.size
        max_length = max_length or plan.calibration.get("max_length", 128)
        batch_size = batch_size or default_batch_size(ir_model, max_length)
        ctx = CompileContext(verification=[], tokenizer_dir=_tokenizer_dir(src, tokenizer_dir),
                             model_dir=src.parent, seed=seed, threads=threads,
                             precision=model_precision(ir_model))
        pipeline = _plan_passes(plan, ir_model, ctx, src, notes, calib=calib, auto=budget is not None,
                                verify=verify, progress=progress)
        calibration = load_calibration(
            calib, ir_model, ctx.tokenizer_dir, batch_size=batch_size, seed=seed,
            max_samples=max_samples or plan.calibration.get("max_samples", DEFAULT_MAX_SAMPLES),
            max_length=max_length,
        )
        verified_on, held_out = _split_calibration(ctx, calibration, ir_model, src, max_length=max_length,
                                                   batch_size=batch_size)
        _set_text_sources(ctx, calib, ir_model, held_out, batch_size=batch_size, seed=seed, max_length=max_length)
        if budget is None:
            results, extra = pipeline.run(ir_model, ctx), {}
        else:
            ir_model, results, extra = _search(ir_model, ctx, budget, objective, search_seconds, progress)
        if notes:
            extra["notes"] = notes
        report = CompileReport(
            model=str(src), output=str(out), recipe=plan.name,
            calibration=calibration.source if calibration is not None else "synthetic inputs (no --calib given)",
            passes=results, size_before=size_before, verified_on=verified_on, unseen_on=ctx.unseen_source,
            precision=ctx.precision.to_dict(), extra=extra,
        )
        runtime = plan_runtime_files(ir_model, out, source_dir=src.parent, tokenizer_dir=ctx.tokenizer_dir)
        if runtime.files:
            report.extra["runtime_files"] = sorted(runtime.files)
        if runtime.notes:
            report.extra["notes"] = [*report.extra.get("notes", []), *runtime.notes]
        if external_data is None and _has_kv_cache(ir_model):
            # a decoder for the runtimes that generate: ONNX Runtime maps weights from a data file
            # where it copies inline ones (SmolLM2 edge-int4 unsplit: a session of 252 MiB against 171)
            external_data = True
        _save_with_report(ir_model, out, report, runtime, external_data=external_data, start=start)
    return report


def _check_arguments(out: Path, recipe, passes, calib, budget: float | None, objective: str,
                     search_seconds: float) -> tuple[Recipe, list[str]]:
    """Everything that needs no model: the output name, the recipe and every pass setting;
    returns the recipe (an empty one for the search) and a note when the default was replaced."""
    if out.suffix != ".onnx":
        raise OnnxpressError(f"output {out} must end in .onnx: choose a name like model.compressed.onnx")
    if budget is not None:
        from onnxpress.auto_search import check_search_args

        check_search_args(budget, objective, recipe, passes, calib, search_seconds)
        return Recipe(name=f"auto (budget {budget:g}, objective {objective})", passes=[]), []
    plan = resolve_recipe(recipe, passes, has_calibration=bool(calib))
    for spec in plan.passes:
        build_pass(spec.name, spec.settings)
    if recipe is None and not passes and not calib:
        return plan, [f"no --calib given: ran the {NO_CALIBRATION_RECIPE} recipe instead of {DEFAULT_RECIPE}"]
    return plan, []


def _plan_passes(plan: Recipe, model: ir.Model, ctx: CompileContext, src: Path, notes: list[str], *, calib,
                 auto: bool, verify: bool, progress: bool) -> Pipeline:
    """The pipeline of the recipe's passes that apply to ``model`` (none for the search), checked
    against the model and the data given; adds a note for each optional pass left out."""
    specs: list[PassSpec] = []
    if not auto:
        specs, skipped = select_passes(plan, model, has_calibration=bool(calib), ctx=ctx)
        notes += skipped
    pipeline = Pipeline([build_pass(s.name, s.settings) for s in specs], verify=verify, progress=progress)
    pipeline.check_applicable(model, ctx, src.name)
    needy = [p.name for p in pipeline.passes if p.needs_calibration]
    if needy and not calib:
        raise OnnxpressError(
            f"passes {', '.join(needy)} need calibration data: pass --calib TEXT_FILES_OR_FOLDER "
            "(tokenizer from the model's folder or --tokenizer) or --calib inputs.npz"
        )
    return pipeline


def _split_calibration(ctx: CompileContext, calibration, model: ir.Model, src: Path, *, max_length: int,
                       batch_size: int) -> tuple[str, int]:
    """Hold ``VERIFY_FRACTION`` of the calibration samples out to verify and measure every stage
    on (synthetic inputs without calibration data); sets ``ctx``'s data and returns what it is and
    how many calibration samples it came from (0: none)."""
    from onnxpress.calibration import CalibrationSet

    if calibration is not None and len(calibration) >= 4:
        ctx.calibration, held_out = calibration.split(VERIFY_FRACTION)
        measured = measured_part(held_out, model, ctx.tokenizer_dir, max_length=max_length, batch_size=batch_size,
                                 seed=ctx.seed)
        ctx.verification = measured.batches
        return _counted(measured, held_out, "held-out calibration samples"), held_out.num_samples
    if calibration is not None:
        ctx.calibration, ctx.verification = calibration, calibration.batches[:1]
        first = calibration.take(1).num_samples
        return f"the first calibration batch ({first} samples, too few to hold any out)", first
    synthetic = CalibrationSet.synthetic(model, seed=ctx.seed, model_dir=src.parent)
    ctx.verification = synthetic.batches
    return f"{synthetic.num_samples} synthetic samples", 0


def _set_text_sources(ctx: CompileContext, calib, model: ir.Model, held_out: int, *, max_length: int,
                      batch_size: int, seed: int) -> None:
    """Where the calibration text came from (distillation trains on more of it) and, for named
    data, as many samples of the domain it never saw as the calibration held out (``held_out``)."""
    ctx.named_text = named_data(calib)
    if ctx.named_text is None and calib and not (len(calib) == 1 and Path(calib[0]).suffix == ".npz"):
        ctx.text_files = [Path(p) for p in calib]
    unseen = unseen_domain_batches(ctx.named_text, model, ctx.tokenizer_dir, held_out, max_length=max_length,
                                   batch_size=batch_size, seed=seed)
    if unseen is not None:
        ctx.unseen, ctx.unseen_source = unseen.batches, unseen.source


def _search(model: ir.Model, ctx: CompileContext, budget: float, objective: str, seconds: float, progress: bool):
    """The automatic search's model, its pass rows, and its trace for the report."""
    from onnxpress.auto_search import SearchSettings, search

    settings = SearchSettings(budget=budget, objective=objective, max_seconds=seconds)
    found = search(model, ctx, settings, kind=model_kind(model), progress=progress)
    return found.model, found.results, {"search": found.to_dict()}


def _save_with_report(model: ir.Model, out: Path, report: CompileReport, runtime: RuntimeFiles, *,
                      external_data: bool | None, start: float) -> None:
    """Write the model (and its external data), ``report`` and the ``runtime`` files beside it, all
    or nothing: every file is written in a temporary folder first and renamed into place at the end."""
    output_folder(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=".onnxpress-", dir=out.parent))
    try:
        side = save_files(runtime, tmp)
        release_freed_memory()  # the last sessions' memory, before the weights are serialised beside it
        saved = save_model(model, tmp / out.name, external_data=external_data)
        report.size_after = files_size(saved)
        report.seconds = time.perf_counter() - start
        report.peak_rss_mb = process_peak_mb()
        report.write_json(tmp / report_path(out).name)
        data = saved.with_name(saved.name + ".data")
        # the model last: it appears only when complete
        move_into_place([*side, *[f for f in (data, tmp / report_path(out).name) if f.exists()], saved], out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _has_kv_cache(model: ir.Model) -> bool:
    return "logits" in [v.name for v in model.graph.outputs] and any(is_past_input(v.name) for v in model.graph.inputs)


def _tokenizer_dir(model_path: Path, tokenizer_dir) -> Path | None:
    """The tokenizer folder when one is given or sits beside the model (only text calibration needs it)."""
    if tokenizer_dir is not None:
        return find_tokenizer_dir(model_path, tokenizer_dir)
    folder = model_path.parent
    return folder if any((folder / f).exists() for f in TOKENIZER_FILES) else None
