"""The distill pass: a compressed tiny model trained back towards its original.

Measured with ONNX Runtime on the verification batches: the distilled model is closer to
the original than the compressed one, only the rewritten initializers change (scope
``rewritten``), the same seed gives the same weights, distillation composes with every
structural pass (shared initializers stay shared), a decoder still generates through its KV
cache, and misuse is a one-line error.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from onnxpress import datasets
from onnxpress.calibration import CalibrationSet
from onnxpress.errors import OnnxpressError
from onnxpress.fidelity import compare_outputs, primary_outputs
from onnxpress.model_io import load_model, save_model
from onnxpress.pass_infra import build_pass
from onnxpress.pipeline import CompileContext, Pipeline

from tiny_models import VOCAB, random_token_batches, tiny_model

FAST = {"steps": 40, "eval_every": 10, "lr": 1e-3, "batch_size": 4, "texts": 400, "max_length": 32}


def _context(model, *, text_from=None) -> CompileContext:
    """Random-token calibration and verification; with ``text_from`` (the model's folder, for
    its tokenizer), distillation trains on SOTU training text and verification is SOTU
    evaluation text."""
    calib = CalibrationSet(random_token_batches(model, 8, 4, 24, seed=0), "random tokens")
    verification = random_token_batches(model, 2, 4, 16, seed=100)
    if text_from is not None:
        verification = CalibrationSet.from_files(datasets.sotu_files("evaluation")[:1], text_from, model,
                                                 max_length=32, batch_size=4, max_samples=8).batches
    ctx = CompileContext(verification=verification, calibration=calib, threads=2, tokenizer_dir=text_from)
    if text_from is not None:
        ctx.text_files = datasets.sotu_files("training")[:2]
    return ctx


def _compile(model, steps, ctx):
    passes = [build_pass(name, settings) for name, settings in steps]
    return Pipeline(passes, progress=False).run(model, ctx)


def _distance_to_original(model, original, ctx) -> float:
    return compare_outputs(ctx.run(original), ctx.run(model)).rel_l2


def _snapshot(model):
    return {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}


@pytest.mark.parametrize("arch, with_past", [("bert", False), ("llama", True)])
def test_distillation_brings_a_pruned_model_back_towards_the_original(arch, with_past):
    path = tiny_model(arch, with_past=with_past)
    original, model = load_model(path), load_model(path)
    ctx = _context(model, text_from=path.parent)
    ctx.output_names = primary_outputs(model)
    pruned_only = load_model(path)
    _compile(pruned_only, [("prune_ffn", {"fraction": 0.5})], _context(pruned_only))
    before = _snapshot(pruned_only)

    prune, distill = _compile(model, [("prune_ffn", {"fraction": 0.5}), ("distill", {**FAST, "scope": "rewritten"})],
                              ctx)
    assert distill.changes["steps"] > 0 and distill.changes["tensors_trained"] > 0
    d = distill.details
    assert d["holdout_loss_after"] < d["holdout_loss_before"]
    assert "text file(s)" in d["text"]
    assert _distance_to_original(model, original, ctx) < _distance_to_original(pruned_only, original, ctx)
    # only what pruning rewrote was trained; everything else is byte-identical
    after = _snapshot(model)
    assert after.keys() == before.keys()
    changed = {n for n in after if not np.array_equal(after[n], before[n])}
    rewritten = {n for n in after if n not in original.graph.initializers
                 or not np.array_equal(after[n], original.graph.initializers[n].const_value.numpy())}
    assert changed and changed <= rewritten


def test_learning_rate_decays_to_zero_by_steps_or_by_the_time_limit_whichever_ends_first():
    from onnxpress.passes.distill.train import Schedule

    schedule = Schedule(steps=100, lr=1e-3, warmup=0.1, max_seconds=60.0, eval_every=10, patience=2)
    assert schedule.fraction_done(50, 6.0) == 0.5  # steps lead
    assert schedule.fraction_done(10, 54.0) == 0.9  # the clock leads
    assert schedule.fraction_done(10, 90.0) == 1.0
    assert schedule.lr_at(0.0) == pytest.approx(1e-4)  # one step's share of the warm-up
    assert schedule.lr_at(0.05) == pytest.approx(5e-4)
    assert schedule.lr_at(0.1) == pytest.approx(1e-3)
    assert schedule.lr_at(0.55) == pytest.approx(5e-4)
    assert schedule.lr_at(1.0) == pytest.approx(0.0, abs=1e-12)
    # early stopping waits for the learning rate to fall to half its peak
    assert not schedule.may_stop_early(0.5) and schedule.may_stop_early(0.55)


def test_without_text_it_trains_on_the_calibration_batches_and_never_ends_worse():
    """Random tokens on random weights give little to learn: the held-out loss decides, and the
    weights kept are never worse on it than the compressed model's."""
    path = tiny_model("llama", with_past=True)
    model = load_model(path)
    _, distill = _compile(model, [("prune_ffn", {"fraction": 0.5}), ("distill", FAST)], _context(model))
    d = distill.details
    assert "calibration batches" in d["text"] and d["train_batches"] >= 1 and d["holdout_batches"] >= 1
    assert d["holdout_loss_after"] <= d["holdout_loss_before"]
    assert d["holdout_loss_after"] == min(loss for _, loss in d["holdout_curve"])


def test_held_out_targets_kept_in_memory_give_the_same_run(monkeypatch):
    import onnxpress.passes.distill.train as train

    path = tiny_model("bert")
    curves = []
    for limit in (train.HOLDOUT_CACHE_BYTES, 0):  # kept after the first evaluation, or recomputed each time
        monkeypatch.setattr(train, "HOLDOUT_CACHE_BYTES", limit)
        model = load_model(path)
        _, distill = _compile(model, [("prune_heads", {"fraction": 0.5}), ("distill", {**FAST, "steps": 20})],
                              _context(model))
        curves.append(distill.details["holdout_curve"])
    assert curves[0] == curves[1] and len(curves[0]) == 3


def test_same_seed_same_weights_and_scope_all_trains_more():
    path = tiny_model("bert")
    runs = []
    for scope in ("rewritten", "rewritten", "all"):
        model = load_model(path)
        _, distill = _compile(model, [("prune_heads", {"fraction": 0.5}),
                                      ("distill", {**FAST, "steps": 10, "scope": scope})], _context(model))
        runs.append((_snapshot(model), distill.changes["tensors_trained"]))
    (a, trained_a), (b, _), (_, trained_all) = runs
    assert all(np.array_equal(a[n], b[n]) for n in a)
    assert trained_all > trained_a > 0


def test_bfloat16_products_where_the_cpu_has_them_and_both_precisions_recover(monkeypatch):
    """``precision: auto`` follows the CPU; the bfloat16 run computes differently (its weights
    differ from the float32 run's) and recovers as well."""
    import onnxpress.passes.distill as distill_pass

    path = tiny_model("bert")
    original = load_model(path)
    runs = {}
    for has_bf16 in (True, False):
        monkeypatch.setattr(distill_pass, "has_bfloat16_matmul", lambda has_bf16=has_bf16: has_bf16)
        model = load_model(path)
        ctx = _context(model, text_from=path.parent)
        pruned = load_model(path)
        _compile(pruned, [("prune_heads", {"fraction": 0.5})], _context(pruned))
        _, distill = _compile(model, [("prune_heads", {"fraction": 0.5}), ("distill", FAST)], ctx)
        d = distill.details
        assert d["matmul_precision"] == ("bfloat16" if has_bf16 else "float32")
        assert d["holdout_loss_after"] < d["holdout_loss_before"]
        assert _distance_to_original(model, original, ctx) < _distance_to_original(pruned, original, ctx)
        runs[has_bf16] = _snapshot(model)
    assert any(not np.array_equal(runs[True][n], runs[False][n]) for n in runs[True])


def test_onednn_keeps_thousands_of_kernels_unless_the_user_chose_how_many(monkeypatch):
    """A kernel per matrix shape: the default cache of 1,024 is too small for a student's shapes."""
    import onnxpress.passes.distill as distill_pass

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    distill_pass._torch()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(distill_pass.ONEDNN_KERNEL_CACHE)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
    distill_pass._torch()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"


@pytest.mark.parametrize("structural", [
    ("lowrank", {"fraction": 0.3, "allocation": "uniform"}),
    ("share_weights", {"fraction": 0.3, "group_size": 2}),
    ("prune_heads", {"fraction": 0.5}),
])
def test_composes_with_every_structural_family(structural, tmp_path):
    path = tiny_model("llama", with_past=True)
    original, model = load_model(path), load_model(path)
    ctx = _context(model, text_from=path.parent)
    ctx.original = original  # the teacher, for the second pipeline run below
    _compile(model, [structural], ctx)
    shared = {n for n, v in model.graph.initializers.items() if len({id(u.node) for u in v.uses()}) > 1}
    compressed = _distance_to_original(model, original, ctx)
    (distill,) = _compile(model, [("distill", FAST)], ctx)
    assert _distance_to_original(model, original, ctx) < compressed
    assert distill.details["layers_matched"] == 2, distill.details["notes"]  # each block's residual stream
    still_shared = {n for n, v in model.graph.initializers.items() if len({id(u.node) for u in v.uses()}) > 1}
    assert shared <= still_shared
    out = save_model(model, tmp_path / "m.onnx")  # loads and runs in ORT: the pipeline verified it too
    assert out.exists()


def test_decoder_generates_through_its_cache_after_distillation(tmp_path):
    from onnxpress.evaluation import generate_greedy

    path = tiny_model("llama", with_past=True)
    model = load_model(path)
    _compile(model, [("prune_ffn", {"fraction": 0.25}), ("distill", FAST)], _context(model))
    out = save_model(model, tmp_path / "model.onnx")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
        if (path.parent / name).exists():
            (tmp_path / name).write_bytes((path.parent / name).read_bytes())
    tokens = generate_greedy(out, tmp_path, "the nation", max_new_tokens=6)
    assert 1 <= len(tokens) <= 6


def test_a_batch_whose_logits_would_not_fit_is_warned_about_before_training(monkeypatch):
    """The estimate counts a training batch's activations, not only multiples of the weights: a
    decoder's logits over its vocabulary grow with batch x tokens, and past free memory the pass
    is warned about before it trains."""
    import onnxpress.memory
    import onnxpress.passes.distill as distill_pass
    from onnxpress.model_io import model_nbytes

    path = tiny_model("llama", with_past=True)
    model = load_model(path)
    fast = {**FAST, "precision": "float32"}
    small, large = (build_pass("distill", {**fast, "batch_size": b}).working_memory(model) for b in (4, 64))
    assert large == 16 * small
    bfloat16 = build_pass("distill", {**fast, "precision": "bfloat16"}).working_memory(model)
    assert bfloat16 == small + distill_pass.KERNEL_CACHE_BYTES  # oneDNN's compiled kernels
    logits = 4 * 64 * FAST["max_length"] * VOCAB
    assert large > 12 * logits > 5 * model_nbytes(model)

    class Machine:  # room for 5x the weights and a batch of 4, not for a batch of 64
        available = 5 * model_nbytes(model) + 2 * small

    monkeypatch.setattr(onnxpress.memory.psutil, "virtual_memory", lambda: Machine)
    ctx = _context(model)
    [result] = _compile(model, [("distill", {**fast, "batch_size": 64, "steps": 2, "eval_every": 1})], ctx)
    assert "GiB of working memory" in result.details["memory_warning"]
    [result] = _compile(load_model(path), [("distill", {**fast, "steps": 2, "eval_every": 1})], _context(model))
    assert "memory_warning" not in result.details


def test_distillation_after_attention_fusion_is_a_one_line_error():
    path = tiny_model("bert")
    model = load_model(path)
    ctx = _context(model)
    _compile(model, [("attention", {})], ctx)
    with pytest.raises(OnnxpressError, match="before attention fusion") as exc:
        _compile(model, [("distill", FAST)], ctx)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("settings, words", [
    ({"steps": 0}, "'steps' must be a positive integer"),
    ({"lr": 2.0}, "'lr' must be between 0 and 1"),
    ({"scope": "some"}, "'scope' must be one of"),
    ({"holdout": 0.7}, "'holdout' must be in"),
    ({"precision": "float8"}, "'precision' must be one of"),
])
def test_config_errors_are_one_line(settings, words):
    with pytest.raises(OnnxpressError, match=words) as exc:
        build_pass("distill", settings)
    assert "\n" not in str(exc.value)
