"""Every tiny architecture through every pass family in one compile.

The pipeline verifies each stage (it loads in ONNX Runtime and agrees with the previous one
within the error the pass reports) or refuses in one line; what a family cannot handle it
skips with a reason; decoders still generate through the KV cache."""

import numpy as np
import pytest

from onnxpress.calibration import make_feeds
from onnxpress.compile import compile_model
from onnxpress.model_io import load_model
from onnxpress.runtime import make_session, run_batches

from tiny_models import DECODER_ARCHS, ENCODER_ARCHS, VOCAB, greedy_tokens, tiny_config_values, tiny_model

ALL_FAMILIES = ["cleanup", "prune_heads:fraction=0.25", "prune_ffn:fraction=0.25", "lowrank:fraction=0.1",
                "attention:optional=true", "quantize:mode=dynamic"]
CASES = [(a, False) for a in ENCODER_ARCHS] + [(a, True) for a in DECODER_ARCHS]


@pytest.mark.parametrize(("arch", "past"), CASES, ids=[a for a, _ in CASES])
def test_every_family_compiles_and_verifies(arch, past, tmp_path):
    calib = tmp_path / "ids.npz"
    np.savez(calib, input_ids=np.random.default_rng(0).integers(5, VOCAB, (16, 32)))
    out = tmp_path / "out.onnx"
    report = compile_model(tiny_model(arch, with_past=past), out, passes=ALL_FAMILIES, calib=[calib],
                           progress=False, threads=1)

    by_name = {p.name: p for p in report.passes}
    assert list(by_name) == [spec.split(":")[0] for spec in ALL_FAMILIES]
    for p in report.passes:
        if p.modified:  # re-measured on the saved stage, within what the pass reported
            assert p.measured_error is not None and p.measured_error <= max(1.5 * p.error, p.error + 1e-4), p.name
    heads = by_name["prune_heads"]
    if tiny_config_values(arch)["num_kv_heads"] == 1:  # one K/V for all heads: no group can go
        assert not heads.modified and heads.details["skipped"]
    else:
        assert heads.changes["heads_removed"] > 0
    for name in ("prune_ffn", "lowrank", "quantize"):
        assert by_name[name].modified, name
    fused = by_name["attention"].details["layers"]  # every layer fused, or skipped with a reason
    assert len(fused) == tiny_config_values(arch)["num_layers"]
    assert all("op" in layer or layer.get("skipped") for layer in fused)

    if past:  # one step through the KV cache agrees with recomputing the whole sequence
        session, model = make_session(out, threads=1), load_model(out)
        ids = np.random.default_rng(3).integers(5, VOCAB, size=(1, 7), dtype=np.int64)
        cached = _last_logits_through_cache(session, model, ids)
        full = run_batches(session, [make_feeds(model, ids, np.ones_like(ids))])[0]["logits"][0, -1]
        # dynamic int8 scales follow each input, so the two paths differ by quantization noise
        assert np.linalg.norm(cached - full) <= 0.05 * np.linalg.norm(full)
        assert len(greedy_tokens(session, model, ids, 8, use_cache=True)) == 8


@pytest.mark.parametrize(("arch", "past"), CASES, ids=[a for a, _ in CASES])
def test_lossless_fuses_every_attention_without_data(arch, past, tmp_path):
    report = compile_model(tiny_model(arch, with_past=past), tmp_path / "out.onnx", recipe="lossless",
                           progress=False, threads=1)
    fused = {p.name: p for p in report.passes}["attention"]
    assert fused.changes["attention_fused"] == tiny_config_values(arch)["num_layers"]
    assert fused.measured_error is not None and fused.measured_error <= 1e-5


def _last_logits_through_cache(session, model, ids) -> np.ndarray:
    """Logits of the last token of ``ids`` fed alone after the others filled the cache."""
    first = run_batches(session, [make_feeds(model, ids[:, :-1], np.ones_like(ids[:, :-1]))])[0]
    past = {n.replace("present", "past_key_values"): v for n, v in first.items() if n.startswith("present")}
    step = {"input_ids": ids[:, -1:], "attention_mask": np.ones_like(ids),
            "position_ids": np.array([[ids.shape[1] - 1]], np.int64), **past}
    return run_batches(session, [step])[0]["logits"][0, -1]  # feeds the session lacks are dropped
