"""The pruning passes on tiny random-weight exports of every recognised architecture,
checked in ONNX Runtime: nothing pruned -> same outputs; pruned -> the saved model
loads, shapes (KV cache included) are consistent, the reported error is the measured
one, and greedy decoding through the KV cache agrees with full recomputation."""

from __future__ import annotations

import numpy as np
import pytest

from onnxpress.analysis import analyze
from onnxpress.calibration import BATCH_SIZE, CalibrationSet, make_feeds
from onnxpress.errors import OnnxpressError
from onnxpress.fidelity import compare_outputs, primary_outputs
from onnxpress.model_io import load_model, save_model
from onnxpress.pass_infra import build_pass
from onnxpress.passes.prune import scoring
from onnxpress.pipeline import CompileContext, Pipeline
from onnxpress.runtime import make_session, run_batches

from tiny_models import (
    ALL_ARCHS,
    DECODER_ARCHS,
    GQA_ARCHS,
    IMAGE_SIZE,
    VOCAB,
    greedy_tokens,
    tiny_config_values,
    tiny_model,
)

CASES = [(a, False) for a in ALL_ARCHS] + [(a, True) for a in DECODER_ARCHS]
IDS = [f"{a}{'-past' if p else ''}" for a, p in CASES]


def _batches(model, n, seed, batch=4, seq=12):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        if any(v.name == "pixel_values" for v in model.graph.inputs):
            out.append({"pixel_values": rng.standard_normal((batch, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)})
            continue
        ids = rng.integers(5, VOCAB, size=(batch, seq), dtype=np.int64)
        mask = np.ones_like(ids)
        mask[-1, seq - 3:] = 0  # one padded row: statistics must ignore it
        out.append(make_feeds(model, ids, mask, seed=seed))
    return out


def _load(arch, past):
    try:
        path = tiny_model(arch, with_past=past)
    except Exception as exc:  # noqa: BLE001 - an exporter gap is not what these tests check
        pytest.skip(f"no tiny export of {arch}: {type(exc).__name__}")
    model = load_model(path)
    if not analyze(model).has_attention:
        pytest.skip(f"the analysis does not recognise {arch} yet")
    return path, model


def _run_pass(model, name, settings, seed=0, path=None):
    """Run one pass; returns (result, ctx, reference outputs of the original ``path`` model
    on the verification batch, taken before the pass resizes its empty KV-cache feeds)."""
    calib = CalibrationSet(_batches(model, 4, seed), "random tokens")
    ctx = CompileContext(verification=_batches(model, 1, seed + 100), calibration=calib, threads=1)
    ref = run_batches(make_session(path, threads=1), ctx.verification) if path is not None else None
    result = Pipeline([build_pass(name, settings)], progress=False).run(model, ctx)[0]
    return result, ctx, ref


def _saved_outputs(model, tmp_path, feeds):
    path = save_model(model, tmp_path / "pruned.onnx")
    session = make_session(path, threads=1)
    return session, run_batches(session, feeds)


@pytest.mark.parametrize("name", ["prune_heads", "prune_ffn"])
@pytest.mark.parametrize(("arch", "past"), CASES, ids=IDS)
def test_fraction_zero_changes_nothing(arch, past, name, tmp_path):
    path, model = _load(arch, past)
    result, ctx, ref = _run_pass(model, name, {"fraction": 0.0}, path=path)
    assert not result.modified
    _, out = _saved_outputs(model, tmp_path, ctx.verification)
    assert compare_outputs(ref, out).rel_l2 <= 1e-5


@pytest.mark.parametrize("name", ["prune_heads", "prune_ffn"])
@pytest.mark.parametrize(("arch", "past"), CASES, ids=IDS)
def test_pruned_model_is_consistent_and_reports_its_error(arch, past, name, tmp_path):
    path, model = _load(arch, past)
    before = analyze(model)
    result, ctx, ref = _run_pass(model, name, {"fraction": 0.5}, path=path)
    if name == "prune_heads" and tiny_config_values(arch)["num_kv_heads"] == 1:
        # one K/V shared by all heads: no whole group can go, every layer says so
        assert not result.modified
        assert len(result.details["skipped"]) == len(before.layers)
        assert all("1 KV group(s)" in why for why in result.details["skipped"])
        return
    assert result.modified and result.params_after < result.params_before

    session, out = _saved_outputs(model, tmp_path, ctx.verification)
    names = primary_outputs(model)
    measured = compare_outputs([{n: r[n] for n in names} for r in ref], [{n: o[n] for n in names} for o in out])
    assert np.isclose(measured.rel_l2, result.error, rtol=0.02, atol=1e-6)
    assert 0 < result.error < 10

    # every output's declared shape agrees with what ONNX Runtime returns
    for spec, array in zip(session.get_outputs(), out[0].values(), strict=True):
        assert len(spec.shape) == array.ndim
        assert all(not isinstance(d, int) or d == a for d, a in zip(spec.shape, array.shape, strict=True)), spec.name

    after = analyze(load_model(tmp_path / "pruned.onnx"))
    if name == "prune_heads":
        heads = sum(a.num_heads for a in after.attentions())
        assert heads == sum(a.num_heads for a in before.attentions()) - result.changes["heads_removed"]
        assert all(a.num_heads >= 1 for a in after.attentions())
        for a_old, a_new in zip(before.attentions(), after.attentions(), strict=True):
            # GQA: whole KV groups go, the query/KV ratio stays
            assert a_new.num_heads * a_old.num_kv_heads == a_old.num_heads * a_new.num_kv_heads
        if arch in GQA_ARCHS:
            assert result.changes["heads_removed"] == 2 * result.changes["kv_groups_removed"]
        if past:  # cache inputs/outputs declare the new KV head count
            kv = {i: a.num_kv_heads for i, a in enumerate(after.attentions())}
            for spec in session.get_inputs():
                if spec.name.startswith("past_key_values."):
                    assert spec.shape[1] == kv[int(spec.name.split(".")[1])]
    else:
        neurons = sum(f.ffn_size for f in after.ffns())
        assert neurons == sum(f.ffn_size for f in before.ffns()) - result.changes["neurons_removed"]


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_greedy_generation_through_the_pruned_kv_cache(arch, tmp_path):
    _, model = _load(arch, True)
    _run_pass(model, "prune_heads", {"fraction": 0.5})
    _run_pass(model, "prune_ffn", {"fraction": 0.25})
    session, _ = _saved_outputs(model, tmp_path, [])
    prompt = np.random.default_rng(3).integers(5, VOCAB, size=(1, 6), dtype=np.int64)
    cached = greedy_tokens(session, model, prompt, 20, use_cache=True)
    full = greedy_tokens(session, model, prompt, 20, use_cache=False)
    assert len(cached) == 20 and cached == full


@pytest.mark.parametrize("name", ["prune_heads", "prune_ffn"])
def test_ort_fused_bert(name, tmp_path):
    """ONNX Runtime's fused graph: com.microsoft.Attention (packed QKV weight, num_heads
    attribute), BiasGelu carrying the up-projection bias, SkipLayerNormalization."""
    from onnxruntime.transformers.optimizer import optimize_model

    fused = tmp_path / "fused.onnx"
    optimize_model(str(tiny_model("bert")), model_type="bert", num_heads=4, hidden_size=64).save_model_to_file(
        str(fused))
    model = load_model(fused)
    assert analyze(model).layers[0].attention.kind == "com.microsoft.Attention"
    result, ctx, ref = _run_pass(model, name, {"fraction": 0.5}, path=fused)
    _, out = _saved_outputs(model, tmp_path, ctx.verification)
    assert result.modified and np.isclose(compare_outputs(ref, out).rel_l2, result.error, rtol=0.02)
    if name == "prune_heads":
        assert sorted(a.num_heads for a in analyze(load_model(tmp_path / "pruned.onnx")).attentions()) != [4, 4]


@pytest.mark.real_model
def test_smollm2_one_kv_group_in_three_still_generates(smollm2_onnx, tmp_path):
    from onnxpress import datasets
    from onnxpress.datasets import load_tokenizer

    model = load_model(smollm2_onnx)
    texts = datasets.text_chunks(datasets.read_text(datasets.sotu_files("calibration")[0]), 200)[:16]
    calib = CalibrationSet.from_texts(texts, smollm2_onnx.parent, model, max_length=48, batch_size=8)
    ctx = CompileContext(verification=calib.batches[:1], calibration=calib, threads=2)
    result = Pipeline([build_pass("prune_heads", {"fraction": 1 / 3})], progress=False).run(model, ctx)[0]
    assert result.changes["kv_groups_removed"] == 30 and result.changes["heads_removed"] == 90
    session, _ = _saved_outputs(model, tmp_path, [])
    prompt = np.asarray([load_tokenizer(smollm2_onnx.parent)("The state of the union is")["input_ids"]])
    tokens = greedy_tokens(session, model, prompt, 20, use_cache=True)
    assert len(tokens) == 20 and tokens == greedy_tokens(session, model, prompt, 20, use_cache=False)


def test_options_naive_baseline_uniform_and_targets(tmp_path):
    _, model = _load("bert", False)
    result, _, _ = _run_pass(model, "prune_heads", {"fraction": 0.5, "score": "weight_norm", "repair": False,
                                                 "allocation": "uniform"})
    assert [layer["removed_kv_groups"] for layer in result.details["layers"]] and result.changes["heads_removed"] == 4
    _, model = _load("bert", False)
    result, _, _ = _run_pass(model, "prune_ffn", {"fraction": 0.3, "target": "params"})
    saved = result.params_before - result.params_after
    ffn_params = sum(f.up.params + f.down.d_in * f.down.d_out for f in analyze(load_model(
        tiny_model("bert"))).ffns())
    assert saved >= 0.3 * ffn_params * 0.95
    _, model = _load("bert", False)
    result, _, _ = _run_pass(model, "prune_heads", {"fraction": 0.25, "target": "macs", "repair": False})
    assert result.macs_after < result.macs_before


@pytest.mark.parametrize(("arch", "expected"), [("bert", "probe"), ("llama", "global")])
def test_layers_share_the_budget_by_probes_on_encoders_and_by_their_own_error_on_decoders(arch, expected):
    _, model = _load(arch, False)
    result, _, _ = _run_pass(model, "prune_ffn", {"fraction": 0.3})
    assert result.details["allocation"] == expected
    assert sum(layer["removed"] for layer in result.details["layers"]) == result.changes["neurons_removed"] > 0


@pytest.mark.parametrize("name", ["prune_ffn", "prune_heads"])
def test_auto_allocation_falls_back_to_global_where_the_probe_cannot_replace_a_projection(name, monkeypatch):
    """A projection ``matrix_of`` cannot read (a transA Gemm, a bias broadcast over rows) cannot
    be replaced in the probe's session: ``auto`` then allocates globally, ``probe`` says how to."""
    readable = scoring.matrix_of
    monkeypatch.setattr(scoring, "matrix_of", lambda lin, key, layer: None if layer == 1 else readable(lin, key, layer))
    _, model = _load("bert", False)
    result, _, _ = _run_pass(model, name, {"fraction": 0.3})
    assert result.details["allocation"] == "global" and "global" in result.details["notes"][0]
    assert result.modified
    _, model = _load("bert", False)
    with pytest.raises(OnnxpressError, match="allocation=global"):
        _run_pass(model, name, {"fraction": 0.3, "allocation": "probe"})


@pytest.mark.parametrize("name", ["prune_ffn", "prune_heads"])
def test_statistics_and_probes_see_augmented_calibration_where_there_is_a_tokenizer(name):
    path, _ = _load("bert", False)
    errors = {}
    for augment, tokenizer_dir in ((0.3, path.parent), (0.0, path.parent), (0.3, None)):
        model = load_model(path)
        calib = CalibrationSet(_batches(model, 4, 0), "random tokens")
        ctx = CompileContext(verification=_batches(model, 1, 100), calibration=calib, threads=1,
                             tokenizer_dir=tokenizer_dir)
        result = Pipeline([build_pass(name, {"fraction": 0.3, "augment": augment})], progress=False).run(model, ctx)[0]
        applied = result.details["calibration_augment"]
        assert applied == (augment if tokenizer_dir else 0.0)
        errors[applied] = [layer["predicted_error"] for layer in result.details["layers"]]
    assert errors[0.3] != errors[0.0]


def _rows(batches):
    return {tuple(row[mask > 0]) for b in batches for row, mask in zip(b["input_ids"], b["attention_mask"], strict=True)}


@pytest.mark.parametrize(("max_batches", "fit_batches"), [(0, 3), (2, 2)])
def test_probes_measure_on_sequences_the_fits_never_saw(max_batches, fit_batches):
    """A probed allocation measures on sequences set apart from those the orders and the probes'
    refits are fitted on: after the pass's first ``max_batches`` batches, or, when it uses them
    all, its last ones, which the rewrite's final refits then add back."""
    _, model = _load("bert", False)
    batches = _batches(model, 4, 0, batch=BATCH_SIZE)  # max_batches counts batches of BATCH_SIZE samples
    ctx = CompileContext(verification=_batches(model, 1, 100), calibration=CalibrationSet(batches, "random tokens"),
                         threads=1)
    cfg = build_pass("prune_ffn", {"fraction": 0.3, "max_batches": max_batches, "probe_samples": 4}).config
    tmap = analyze(model)
    downs = [(layer.ffn.down, layer) for layer in tmap.layers]
    stats = scoring.calibration_stats(model, ctx, "prune_ffn", cfg, tmap.kind, downs)
    fit_tokens = sum(int(b["attention_mask"].sum()) for b in batches[:fit_batches])
    used_tokens = sum(int(b["attention_mask"].sum()) for b in batches[:max_batches or len(batches)])
    assert [s.gram.count for s in stats.fit] == [fit_tokens] * len(downs)
    assert [s.gram.count for s in stats.final] == [used_tokens] * len(downs)
    assert len(_rows(stats.probes)) == 4 and not _rows(stats.probes) & _rows(batches[:fit_batches])
    global_cfg = build_pass("prune_ffn", {"fraction": 0.3, "allocation": "global"}).config
    unprobed = scoring.calibration_stats(model, ctx, "prune_ffn", global_cfg, tmap.kind, downs)
    assert unprobed.probes == [] and unprobed.fit[0].gram.count == sum(int(b["attention_mask"].sum()) for b in batches)


def test_repair_and_calibrated_scores_beat_the_naive_choice():
    """On a tiny BERT the calibrated choice with repair moves the output less than the
    weight-norm choice without repair, at the same number of heads."""
    _, model_a = _load("bert", False)
    naive, _, _ = _run_pass(model_a, "prune_heads", {"fraction": 0.5, "score": "weight_norm", "repair": False})
    _, model_b = _load("bert", False)
    ours, _, _ = _run_pass(model_b, "prune_heads", {"fraction": 0.5})
    assert naive.changes["heads_removed"] == ours.changes["heads_removed"]
    assert ours.error < naive.error


@pytest.mark.parametrize(
    ("name", "settings", "fragment"),
    [
        ("prune_heads", {"fraction": 1.0}, "'fraction' must be in [0, 1)"),
        ("prune_heads", {"fraction": -0.1}, "'fraction' must be in [0, 1)"),
        ("prune_heads", {"target": "neurons"}, "'target' must be one of heads, params, macs"),
        ("prune_ffn", {"target": "heads"}, "'target' must be one of neurons, params, macs"),
        ("prune_ffn", {"score": "magic"}, "'score' must be one of"),
        ("prune_ffn", {"allocation": "random"}, "'allocation' must be"),
        ("prune_ffn", {"probe_samples": 0}, "'probe_samples' must be a positive"),
        ("prune_heads", {"min_groups_per_layer": 0}, "'min_groups_per_layer' must be at least 1"),
        ("prune_ffn", {"ridge": -1}, "'ridge' must be in"),
        ("prune_heads", {"augment": 1.0}, "'augment' must be in"),
        ("prune_ffn", {"fraction": "a lot"}, "'fraction' must be a number"),
        ("prune_heads", {"heads": 3}, "unknown setting 'heads'"),
    ],
)
def test_config_errors_are_one_line(name, settings, fragment):
    with pytest.raises(OnnxpressError) as info:
        build_pass(name, settings)
    message = str(info.value)
    assert fragment in message and "\n" not in message and message.startswith(name)


def test_passes_declare_their_needs():
    for name in ("prune_heads", "prune_ffn"):
        cls = type(build_pass(name))
        assert cls.needs_attention and cls.needs_calibration and not cls.lossless
