"""Packaged recipes, recipe-level keys (optional, only) and the default recipe."""

import json

import numpy as np
import onnxruntime as ort
import pytest

from onnxpress.compile import (
    DEFAULT_RECIPE,
    compile_model,
    model_kind,
    report_path,
    resolve_recipe,
    select_passes,
)
from onnxpress.errors import OnnxpressError
from onnxpress.model_io import load_model
from onnxpress.pass_infra import build_pass
from onnxpress.recipe import load_recipe, packaged_recipes, parse_pass_args

from graphs import mlp_model, save
from tiny_models import tiny_model


def test_packaged_recipes_load_and_every_setting_validates():
    assert {"lossless", "balanced", "small", "edge-int4"} <= set(packaged_recipes())
    for name in packaged_recipes():
        recipe = load_recipe(name)
        assert recipe.description.strip(), name
        for spec in recipe.passes:
            build_pass(spec.name, spec.settings)  # raises on an unknown or badly typed setting
    assert DEFAULT_RECIPE == "balanced"


def test_lossless_recipe_is_exact_passes_only():
    for spec in load_recipe("lossless").passes:
        assert build_pass(spec.name, spec.settings).lossless, spec.name


def test_recipe_keys_are_split_from_pass_settings():
    (spec,) = parse_pass_args(["attention:target=onnx,optional=true,only=decoder"]).passes
    assert spec.settings == {"target": "onnx"} and spec.optional and spec.only == "decoder"
    assert spec.applies_to("decoder") and not spec.applies_to("encoder")
    with pytest.raises(OnnxpressError, match="'only' must be encoder or decoder"):
        parse_pass_args(["attention:only=vision"])
    with pytest.raises(OnnxpressError, match="'optional' must be true or false"):
        parse_pass_args(["attention:optional=maybe"])


def test_lossless_on_a_model_without_attention_skips_the_attention_pass_with_a_note(tmp_path):
    src = save(mlp_model(), tmp_path / "mlp.onnx")
    out = tmp_path / "mlp.out.onnx"
    report = compile_model(src, out, recipe="lossless", progress=False)
    assert [p.name for p in report.passes] == ["cleanup"]
    saved = json.loads(report_path(out).read_text())
    assert any("skipped optional pass attention" in n for n in saved["extra"]["notes"])
    assert "note: skipped optional pass attention" in report.format_table()
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    ref, new = (ort.InferenceSession(str(p)).run(None, {"x": x})[0] for p in (src, out))
    np.testing.assert_allclose(new, ref, rtol=1e-6, atol=1e-6)


def test_required_attention_pass_still_fails_on_a_model_without_attention(tmp_path):
    src = save(mlp_model(), tmp_path / "mlp.onnx")
    with pytest.raises(OnnxpressError, match="no transformer attention recognised"):
        compile_model(src, tmp_path / "o.onnx", passes=["cleanup", "attention"], progress=False)


def test_lossless_on_a_transformer_fuses_attention_exactly(tmp_path):
    src = tiny_model("bert")
    out = tmp_path / "bert.onnx"
    report = compile_model(src, out, recipe="lossless", progress=False)
    assert [p.name for p in report.passes] == ["cleanup", "attention"]
    assert report.passes[1].modified and report.passes[1].measured_error <= 1e-5


def test_default_recipe_without_calibration_falls_back_to_lossless_and_says_so(tmp_path):
    src = save(mlp_model(), tmp_path / "mlp.onnx")
    assert resolve_recipe(None, None, has_calibration=False).name == "lossless"
    assert resolve_recipe(None, None, has_calibration=True).name == "balanced"
    report = compile_model(src, tmp_path / "o.onnx", progress=False)
    assert report.recipe == "lossless"
    assert any("instead of balanced" in n for n in report.extra["notes"])


def test_per_kind_passes_follow_the_model_kind():
    enc = load_model(tiny_model("bert"))
    dec = load_model(tiny_model("llama"))
    assert model_kind(enc) == "encoder" and model_kind(dec) == "decoder"
    recipe = load_recipe("balanced")
    enc_specs, _ = select_passes(recipe, enc, has_calibration=True)
    dec_specs, _ = select_passes(recipe, dec, has_calibration=True)
    assert [s.name for s in enc_specs] == [s.name for s in recipe.passes if s.only in (None, "encoder")]
    assert [s.name for s in dec_specs] == [s.name for s in recipe.passes if s.only in (None, "decoder")]


def test_balanced_compiles_a_decoder_with_kv_cache(tmp_path):
    """The decoder half of the default recipe: exact attention and decoder fusions, then int8
    weight-only; every stage within the error it reports (the pass manager checks)."""
    np.savez(tmp_path / "calib.npz", input_ids=np.random.default_rng(0).integers(5, 1000, (24, 20)))
    report = compile_model(tiny_model("llama", with_past=True), tmp_path / "out.onnx",
                           calib=[tmp_path / "calib.npz"], progress=False, threads=1)
    assert [p.name for p in report.passes] == ["cleanup", "attention", "fuse", "quantize"]
    attention, fused, quantize = report.passes[1:]
    assert attention.changes["attention_fused"] > 0
    assert fused.changes["rotary_into_attention"] > 0 and fused.measured_error <= 1e-5
    assert quantize.changes["matmuls_quantized"] > 0 and quantize.changes["fused_integer_kernels"] > 0
    assert quantize.measured_error <= max(quantize.error * 1.02, 1e-6)
    assert quantize.changes["matmuls_int8"] == quantize.changes["matmuls_quantized"]
    assert quantize.vs_input["perplexity_change"] < 0.02
