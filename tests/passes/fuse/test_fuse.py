"""The decoder fusion pass on tiny random-weight decoders, checked in ONNX Runtime against the
attention-fused graph it rewrites: logits and present.* through the KV cache (prefill, one-token
steps, a chunk at batch 1) within float error, counters, greedy generation unchanged, models it
cannot match left exactly as they were, and the quantizers after it still finding every MatMul."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxpress.analysis import analyze
from onnxpress.calibration import counted_positions, make_feeds
from onnxpress.errors import OnnxpressError
from onnxpress.generation import DecoderRunner
from onnxpress.model_io import load_model, model_proto
from onnxpress.pass_infra import build_pass
from onnxpress.passes.attention import substitute_attention
from onnxpress.passes.fuse import fuse
from onnxpress.pipeline import Pipeline
from onnxpress.runtime import make_session, session_options

from tiny_models import LAYERS, MAX_POS, VOCAB, random_token_context, tiny_model, tiny_model_fp16

TOL = 1e-5  # float32: relative to the largest output value
# decoders whose norms, rotation and rotation-in-attention all fuse (Phi-3: packed QKV and a
# whole-head "partial" rotation; Qwen3: per-head norms between projection and rotation; Qwen2:
# projection biases)
FULL = ["llama", "qwen2", "mistral", "phi3", "qwen3", "granite"]
# (batch, new tokens, cached tokens): right-padded prefill, a decode step, a chunk after a cache
STEPS = [(2, 7, 0), (2, 1, 5), (1, 3, 5)]


def _attention_fused(arch: str, path=None):
    """The tiny export with cleanup and attention fusion run, and the same graph kept aside."""
    model = load_model(path or tiny_model(arch, with_past=True))
    build_pass("cleanup").apply(model, None)
    substitute_attention(model)
    return model, model.clone()


def _feeds(model, batch: int, seq: int, past: int, seed: int) -> dict:
    """Random tokens after ``past`` cached random keys/values; the last row of a prefill
    right-padded by 2, positions counted as the calibration data counts them."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, past + seq), np.int64)
    if batch > 1 and past == 0:
        mask[-1, -2:] = 0
    feeds = make_feeds(model, rng.integers(5, VOCAB, (batch, seq)), mask[:, -seq:])
    feeds["attention_mask"] = mask
    if "position_ids" in feeds:
        feeds["position_ids"] = counted_positions(mask)[:, -seq:]
    for name, value in feeds.items():
        if name.startswith("past"):
            feeds[name] = rng.standard_normal((batch, value.shape[1], past, value.shape[3])).astype(value.dtype)
    return feeds


def _worst(ref, new, steps=STEPS) -> float:
    """Largest output difference (logits and present.*) over ``steps``, relative to the output's scale."""
    a, b = make_session(ref, threads=1), make_session(new, threads=1)
    names = [o.name for o in a.get_outputs()]
    assert names == [o.name for o in b.get_outputs()], "graph outputs changed"
    worst = 0.0
    for i, step in enumerate(steps):
        feeds = _feeds(ref, *step, seed=i)
        for x, y in zip(a.run(names, feeds), b.run(names, feeds), strict=True):
            assert x.shape == y.shape
            worst = max(worst, float(np.abs(x - y).max() / np.abs(x).max()))
    return worst


def _ops(model) -> list[str]:
    return [n.op_type for n in model.graph]


def _ops_after_ort_optimizations(model, tmp_path) -> list[str]:
    """The op types of the graph an ORT session runs after its load-time fusions."""
    options = session_options(1)
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    make_session(model, options=options)
    return [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]


@pytest.mark.parametrize("arch", FULL)
def test_fused_decoder_matches_through_the_kv_cache(arch, tmp_path):
    model, ref = _attention_fused(arch)
    outcome = fuse(model, max_positions=MAX_POS)
    changes = outcome.changes
    assert changes["skip_norms_fused"] == 2 * LAYERS  # both residual Adds of each layer
    assert changes["rotary_fused"] == 2 * LAYERS and changes["rotary_into_attention"] == LAYERS, outcome.details
    assert changes["nodes_removed"] > 0 and outcome.details["notes"] == {}
    attention = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert len(attention) == LAYERS and all(n.attributes.get_int("do_rotary") == 1 for n in attention)
    assert all(n.inputs[7].const_value.shape[0] == MAX_POS for n in attention)  # cos table, one row a position
    for op in ("Neg", "Sin", "Cos", "RotaryEmbedding"):
        assert op not in _ops(model), op
    assert _ops(model).count("SkipSimplifiedLayerNormalization") == 2 * LAYERS
    # norms with no residual Add before them (the first layer's, Qwen3's per-head ones) stay
    # for ORT to fuse when it loads the model, and it does
    left = 1 + 2 * LAYERS if arch == "qwen3" else 1
    assert _ops(model).count("Pow") == left == changes["norms_spelled_for_ort"]
    assert "Reciprocal" not in _ops(model)
    loaded = _ops_after_ort_optimizations(model, tmp_path)
    assert loaded.count("SimplifiedLayerNormalization") == left and "Pow" not in loaded
    assert set(model.opset_imports) == {"", "com.microsoft"}
    assert _worst(ref, model) < TOL


def test_greedy_generation_through_the_cache_is_unchanged():
    model, ref = _attention_fused("llama")
    fuse(model, max_positions=MAX_POS)
    prompt = [5, 17, 300, 42, 99, 7, 123]
    tokens = [DecoderRunner(m, threads=1).generate(prompt, 20).tokens for m in (ref, model)]
    assert tokens[0] == tokens[1]


def test_rotary_fuses_apart_where_the_attention_cannot_rotate():
    """Phi's tables are 4 wide (a quarter of a 16-wide head): ORT's attention rotates only
    multiples of 8, so the rotation stays a RotaryEmbedding, said why, and still matches."""
    model, ref = _attention_fused("phi")
    outcome = fuse(model, max_positions=MAX_POS)
    assert outcome.changes["rotary_fused"] == 2 * LAYERS and outcome.changes["rotary_into_attention"] == 0
    assert "multiples of 8" in outcome.details["notes"]["rotary into attention"]
    assert _ops(model).count("RotaryEmbedding") == 2 * LAYERS
    assert _worst(ref, model) < TOL


@pytest.mark.parametrize("path", [lambda: tiny_model("gpt2", with_past=True), lambda: tiny_model("bert")],
                         ids=["gpt2", "bert"])
def test_models_without_rms_norm_or_rotary_are_left_unchanged(path):
    model, ref = _attention_fused("", path())
    outcome = fuse(model, max_positions=MAX_POS)
    assert not outcome.modified and "unchanged" in outcome.details
    assert model_proto(model).SerializeToString() == model_proto(ref).SerializeToString()


def test_without_the_context_length_the_rotation_is_left_with_a_reason():
    model, ref = _attention_fused("llama")
    outcome = fuse(model, max_positions=None)
    assert outcome.changes["rotary_fused"] == 0 and outcome.changes["skip_norms_fused"] > 0
    assert "max_positions" in outcome.details["notes"]["rotary"]
    assert _worst(ref, model) < TOL


def test_positions_computed_in_the_graph_are_not_fused():
    """Gemma's export counts positions in the graph as one [1, sequence] row, which ORT's
    RotaryEmbedding refuses at batch 2: the rotation stays, with the reason."""
    model, ref = _attention_fused("gemma")
    outcome = fuse(model, max_positions=MAX_POS)
    assert outcome.changes["rotary_fused"] == 0
    assert "[batch, sequence]" in outcome.details["notes"]["rotary"]
    assert _worst(ref, model) < TOL


def test_float16_norms_fuse_within_half_precision():
    model, ref = _attention_fused("llama", tiny_model_fp16("llama", with_past=True))
    outcome = fuse(model, max_positions=MAX_POS)
    assert outcome.changes["skip_norms_fused"] > 0
    assert _worst(ref, model) < 5e-3  # float16 rounding: the fused norm's statistics are float32


def test_pass_is_verified_lossless_and_reads_the_context_length_from_config():
    path = tiny_model("llama", with_past=True)
    model = load_model(path)
    ctx = random_token_context(model)  # right padding, positions counted through it
    ctx.model_dir = path.parent
    reports = Pipeline([build_pass("cleanup"), build_pass("attention"), build_pass("fuse")], progress=False).run(
        model, ctx)
    fused = reports[-1]
    assert fused.changes["rotary_into_attention"] == LAYERS
    assert fused.error < TOL and fused.measured_error < TOL
    tables = {n.inputs[7].const_value.shape[0] for n in model.graph if n.op_type == "GroupQueryAttention"}
    assert tables == {MAX_POS}  # config.json's max_position_embeddings


def test_left_padded_check_data_keeps_the_rotation_apart():
    """Left-padded rows' positions are not the cache-length positions GroupQueryAttention would
    count: the rotation is not folded into it (and the stage still checks out exact)."""
    path = tiny_model("llama", with_past=True)
    model = load_model(path)
    ctx = random_token_context(model)
    for feeds in ctx.verification:
        mask = np.ones_like(feeds["attention_mask"])
        mask[0, :3] = 0
        feeds["attention_mask"], feeds["position_ids"] = mask, counted_positions(mask)
    ctx.reference = ctx.run(model)
    ctx.model_dir = path.parent
    fused = Pipeline([build_pass("attention"), build_pass("fuse")], progress=False).run(model, ctx)[-1]
    assert fused.changes["rotary_into_attention"] == 0 and fused.changes["rotary_fused"] == 2 * LAYERS
    assert "left padding" in fused.details["notes"]["rotary into attention"]
    assert fused.measured_error < TOL


@pytest.mark.parametrize("quantize", [{"mode": "dynamic"}, {"mode": "weight_only", "bits": 4, "block_size": 16}],
                         ids=["dynamic", "int4"])
def test_quantizers_after_it_find_every_matmul(quantize):
    path = tiny_model("llama", with_past=True)
    counts = []
    for with_fuse in (False, True):
        model = load_model(path)
        ctx = random_token_context(model)
        ctx.model_dir = path.parent
        passes = ["cleanup", "attention", *(["fuse"] if with_fuse else [])]
        reports = Pipeline([*map(build_pass, passes), build_pass("quantize", quantize)], progress=False).run(
            model, ctx)
        counts.append(reports[-1].changes["matmuls_quantized"])
        assert analyze(model).num_layers == LAYERS
    assert counts[0] == counts[1] > 0


def test_config_is_validated():
    with pytest.raises(OnnxpressError, match="max_positions"):
        build_pass("fuse", {"max_positions": -1})
    with pytest.raises(OnnxpressError, match="rotary_into_attention"):
        build_pass("fuse", {"rotary": False})
    assert build_pass("fuse", {"rotary": "false", "rotary_into_attention": "false"}).config.rotary is False


def test_after_activation_quantization_the_change_is_measured_not_assumed_zero():
    """Exact in float, but int8 activations round differently after it: checked as a lossy pass."""
    path = tiny_model("llama", with_past=True)
    model = load_model(path)
    ctx = random_token_context(model)
    ctx.model_dir = path.parent
    passes = [build_pass("attention"), build_pass("quantize", {"mode": "dynamic"})]
    Pipeline(passes, progress=False).run(model, ctx)
    fuse_pass = build_pass("fuse")
    fused = Pipeline([fuse_pass], progress=False).run(model, ctx)[-1]
    assert fused.changes["rotary_into_attention"] == LAYERS and not fuse_pass.lossless
    assert fused.measured_error <= fused.error * 1.02 + 1e-6
