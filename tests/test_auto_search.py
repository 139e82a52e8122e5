"""Accuracy-budgeted automatic compression (``compile --budget``) on a tiny random-weight BERT."""

import json

import numpy as np
import pytest

from onnxpress import model_io
from onnxpress.auto_search import MIN_GAIN, Candidate, _most_faithful_near_best, _next_strength
from onnxpress.calibration import CalibrationSet
from onnxpress.cli import main
from onnxpress.compile import VERIFY_FRACTION, compile_model, report_path
from onnxpress.errors import OnnxpressError
from onnxpress.fidelity import FidelityMeter, mean_pool
from onnxpress.model_io import load_model
from onnxpress.runtime import make_session, run_batches

from tiny_models import tiny_model

CALIB = dict(calib=["sotu"], max_samples=48, max_length=32, threads=1, progress=False)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    src = tiny_model("bert")
    out = tmp_path_factory.mktemp("auto") / "bert.auto.onnx"
    budget = 0.05
    with pytest.MonkeyPatch.context() as patch:
        # compiled as a real model's file is: from a copy with its weights in a data file
        patch.setattr(model_io, "INLINE_MAP_MIN_BYTES", 0)
        report = compile_model(src, out, budget=budget, objective="latency", **CALIB)
    return src, out, report, budget


def held_out(src):
    """The held-out split compile_model measured on, rebuilt the same way."""
    from onnxpress.datasets import sotu_files

    calib = CalibrationSet.from_files(sotu_files("calibration"), src.parent, load_model(src), max_length=32,
                                      batch_size=8, max_samples=48, seed=0)
    return calib.split(VERIFY_FRACTION)[1].batches


def test_trace_lists_every_measured_candidate_and_marks_the_chosen_one(searched):
    src, out, report, budget = searched
    found = json.loads(report_path(out).read_text())["extra"]["search"]
    labels = [c["label"] for c in found["trace"]]
    assert labels[0].startswith("exact base") and any(lab.startswith("quantize") for lab in labels)
    assert any(lab.startswith(("prune_ffn", "prune_heads")) for lab in labels), labels
    assert found["chosen"] in labels and found["budget"] == budget
    chosen = next(c for c in found["trace"] if c["label"] == found["chosen"])
    assert chosen["fits"] and chosen["compressed"] and chosen["loss"] <= chosen["loss_bound"] <= budget
    # the chosen one is the most faithful of the candidates within MIN_GAIN of the fastest,
    # all of them timed together at the end
    fitting = [c for c in found["trace"] if c["fits"] and c["compressed"]]
    assert len(fitting) > 1 and any("timed round-robin" in note for note in found["notes"]), found["notes"]
    fastest = min(c["latency_ms"] for c in fitting)
    near = [c for c in fitting if c["latency_ms"] <= fastest * (1 + MIN_GAIN)]
    assert chosen["loss"] == min(c["loss"] for c in near)
    # the exact base loses nothing; its size is its weights', which were in a data file
    assert found["trace"][0]["loss"] < 1e-5
    assert found["trace"][0]["size_bytes"] > 0.9 * model_io.model_nbytes(load_model(src))
    assert "search (budget" in report.format_table()


def test_a_decoder_search_ends_in_the_weight_only_quantisation_of_the_decoder_recipes(tmp_path):
    src = tiny_model("llama", with_past=True)
    out = tmp_path / "llama.auto.onnx"
    report = compile_model(src, out, budget=0.05, objective="latency", search_seconds=20, **CALIB)
    found = report.extra["search"]
    quantized = [c for c in found["trace"] if c["label"].startswith("quantize")]
    assert quantized and "mode=weight_only" in quantized[0]["label"] and "bits=8" in quantized[0]["label"]
    assert found["trace"][0]["label"] == "exact base (cleanup + attention + fuse)"
    ops = {n.op_type for n in load_model(out).graph}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops  # the exact fusions, applied last


def measure(meter, model):
    return meter.measure(run_batches(make_session(model, threads=1), meter.batches, meter.outputs))


def test_returned_model_is_within_budget_when_measured_again(searched):
    src, out, report, budget = searched
    batches = held_out(src)
    meter = FidelityMeter.of_model(load_model(src), batches, kind="encoder", threads=1)
    fid = measure(meter, load_model(out))
    found = report.extra["search"]
    assert fid.loss <= fid.loss_bound <= budget
    loss, bound = found["chosen_domains"]["calibration"]
    assert fid.loss == pytest.approx(loss, rel=1e-3, abs=1e-6)
    assert fid.loss_bound == pytest.approx(bound, rel=1e-3, abs=1e-6)
    # the chosen candidate is judged by the worse of its domains, the unseen one (BBC News) included
    assert set(found["chosen_domains"]) == {"calibration", "unseen"}
    assert found["chosen_loss_bound"] == max(b for _, b in found["chosen_domains"].values())
    assert [p.name for p in report.passes][:1] == ["cleanup"] and len(report.passes) >= 2
    # the compile report's end-to-end fidelity is the search's loss of the chosen model, on both domains
    assert report.fidelity["loss"] == pytest.approx(loss, rel=1e-3, abs=1e-6)
    assert report.fidelity_unseen["loss"] == pytest.approx(found["chosen_domains"]["unseen"][0], rel=1e-3, abs=1e-6)


def test_fidelity_meter_pooled_cosine_matches_a_direct_computation():
    src = tiny_model("bert")
    batches = held_out(src)
    meter = FidelityMeter.of_model(load_model(src), batches, kind="encoder", threads=1)
    assert meter.pooled and measure(meter, load_model(src)).loss == pytest.approx(0.0, abs=1e-9)
    # a perturbed reference: loss = 1 - mean cosine of mask-pooled embeddings
    ref = meter.reference
    noisy = [{k: v + 0.5 * np.random.default_rng(0).standard_normal(v.shape) for k, v in r.items()} for r in ref]
    meter.reference = noisy
    fid = measure(meter, load_model(src))
    loss, bound = fid.loss, fid.loss_bound
    name = meter.outputs[0]
    a = np.concatenate([mean_pool(n[name], b["attention_mask"]) for n, b in zip(noisy, batches, strict=True)])
    b_ = np.concatenate([mean_pool(r[name], b["attention_mask"]) for r, b in zip(ref, batches, strict=True)])
    cos = (a * b_).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b_, axis=1)
    assert loss == pytest.approx(1 - cos.mean(), rel=1e-9)
    assert (fid.cosine_mean, fid.cosine_min) == pytest.approx((cos.mean(), cos.min()), rel=1e-9)
    # the bound: two standard errors of the per-sentence loss above the mean
    assert bound == pytest.approx(loss + 2 * (1 - cos).std(ddof=1) / np.sqrt(len(cos)), rel=1e-6)


def test_fidelity_meter_decoder_bound_covers_the_perplexity_shift():
    src = tiny_model("gpt2")
    meter = FidelityMeter.of_model(load_model(src), held_out(src), threads=1)
    assert meter.kind == "decoder" and meter.outputs == ["logits"]
    fid = measure(meter, load_model(src))
    loss, bound = fid.loss, fid.loss_bound
    assert loss == pytest.approx(0.0, abs=1e-9) and bound == pytest.approx(0.0, abs=1e-9)
    # a reference better by 0.1 nats per token on average, unevenly across sequences
    delta = np.random.default_rng(0).normal(0.1, 0.05, len(meter.reference_rows))
    meter.reference_rows = meter.reference_rows - delta
    meter.reference_nll -= 0.1
    fid = measure(meter, load_model(src))
    loss, bound = fid.loss, fid.loss_bound
    assert loss == fid.perplexity_change == pytest.approx(np.expm1(0.1), rel=1e-6)
    assert bound == pytest.approx(np.expm1(0.1 + 2 * delta.std(ddof=1) / np.sqrt(len(delta))), rel=1e-6)


def test_a_lossier_candidate_must_beat_a_faithful_one_by_more_than_the_noise():
    def cand(label, loss, ms):
        return Candidate(label, [], loss, loss, ms, 1, True, 0.0, True)

    quant, pruned, fast = cand("quantize", 0.004, 100.0), cand("prune+quantize", 0.008, 97.0), cand("x", 0.009, 90.0)
    latency = lambda c: c.latency_ms  # noqa: E731
    assert _most_faithful_near_best([quant, pruned], latency) is quant  # 3% faster: noise, keep fidelity
    assert _most_faithful_near_best([quant, pruned, fast], latency) is fast  # 10% faster: worth it


def test_secant_step_stays_inside_the_bracket():
    assert _next_strength(0.0, 0.0, 0.4, 0.04, 0.01, 0.6) == pytest.approx(0.2)  # loss ~ s^2
    nxt = _next_strength(0.1, 0.002, 0.4, 0.04, 0.01, 0.6)
    assert 0.1 < nxt < 0.4
    assert _next_strength(0.1, 0.0025, None, None, 0.01, 0.6) == pytest.approx(0.2)


def test_impossible_budget_is_one_line(capsys, tmp_path):
    src = tiny_model("bert")
    out = tmp_path / "o.onnx"
    code = main(["compile", str(src), "-o", str(out), "--budget", "1e-9", "--calib", "sotu", "--max-samples", "32",
                 "--seq-len", "32", "--threads", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no compression fits --budget 1e-09" in err
    assert "raise --budget to at least" in err and not out.exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(budget=1.5), "between 0 and 1"),
        (dict(budget=0.01, objective="speed"), "use latency or size"),
        (dict(budget=0.01, recipe="small"), "drop --recipe"),
        (dict(budget=0.01, calib=None), "needs calibration data"),
        (dict(budget=0.01, search_seconds=0), "--search-seconds must be positive"),
    ],
)
def test_bad_search_arguments_fail_before_any_work(tmp_path, kwargs, message):
    args = {**CALIB, **kwargs}
    with pytest.raises(OnnxpressError, match=message):
        compile_model(tiny_model("bert"), tmp_path / "o.onnx", **args)
