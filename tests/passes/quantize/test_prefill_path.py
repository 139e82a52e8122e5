"""prefill_path: decode steps run the graph as it was, prompts its copy with float-compute
MatMulNBits; checked against ONNX Runtime running each kernel choice on its own."""

from __future__ import annotations

import shutil

import numpy as np
import onnx_ir as ir
import pytest

from onnxpress.analysis import analyze, count_macs
from onnxpress.errors import OnnxpressError
from onnxpress.evaluation import window_nll
from onnxpress.generation import DecoderRunner, eos_token_ids
from onnxpress.model_io import load_model, save_model
from onnxpress.pass_infra import build_pass
from onnxpress.passes.quantize import prefill_path
from onnxpress.passes.quantize.prefill_path import split_prefill
from onnxpress.pipeline import Pipeline
from onnxpress.runtime_files import genai_runner, optimum_runner, write_runtime_files
from tests.passes.quantize.test_quantize import _context
from tests.tiny_models import tiny_model

LIMIT = 8  # tokens per call (batch x sequence) still run as decode steps


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """The tiny Llama with its KV cache, 4-bit weights run with int8 activations (level 4)."""
    model = load_model(tiny_model("llama", with_past=True))
    build_pass("quantize", {"mode": "weight_only", "bits": 4, "accuracy_level": 4}).run(model, _context(model))
    return save_model(model, tmp_path_factory.mktemp("prefill") / "level4.onnx")


def _with_level(path, level: int, out):
    model = load_model(path)
    for node in model.graph:
        if node.op_type == "MatMulNBits":
            node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", level)
    return save_model(model, out)


@pytest.fixture(scope="module")
def split(quantized):
    model = load_model(quantized)
    ctx = _context(model)
    report = build_pass("prefill_path", {"max_decode_tokens": LIMIT, "when": "always"}).run(model, ctx)
    return save_model(model, quantized.parent / "split.onnx"), report


def _logits_and_cache(path, ids, start=0, cache=None):
    return DecoderRunner(path, threads=1).run(ids, start, cache)


def test_the_nodes_between_the_4bit_kernels_go_into_an_if_and_every_kernel_is_counted(quantized, split):
    path, report = split
    before, after = load_model(quantized), load_model(path)
    kernels = sum(n.op_type == "MatMulNBits" for n in before.graph)
    assert report.modified and report.changes["kernels_retargeted"] == kernels > 0
    (branch,) = [n for n in after.graph if n.op_type == "If"]
    then, other = (list(branch.attributes[b].as_graph()) for b in ("then_branch", "else_branch"))
    assert len(then) == len(other) == report.changes["nodes_in_each_branch"]
    # what runs before the first 4-bit kernel (the embedding Gather) and after the last runs once
    outside = [n for n in after.graph if n.op_type not in ("Size", "Greater", "If")]
    assert len(outside) == report.details["nodes_outside"] > 0
    assert len(outside) + len(then) == len(list(before.graph))
    assert "Gather" in {n.op_type for n in outside}
    assert [v.name for v in after.graph.outputs] == [v.name for v in before.graph.outputs]
    assert report.details["decode_step_max_abs_diff"] == 0.0
    assert report.details["prompt_ms_prompt_kernels"] > 0 and report.details["prompt_ms_decode_kernels"] > 0
    # the analysis reads the decode branch: the same layers and work per token as before
    assert count_macs(after) == count_macs(before) == report.macs_after == report.macs_before
    assert len(analyze(after).layers) == len(analyze(before).layers) > 0


@pytest.mark.parametrize("batch,tokens", [(1, 1), (1, LIMIT), (2, LIMIT // 2)])
def test_calls_up_to_the_limit_run_the_graph_as_it_was(quantized, split, batch, tokens):
    ids = np.random.default_rng(batch * 100 + tokens).integers(5, 1000, (batch, tokens))
    expected, _ = _logits_and_cache(quantized, ids)
    got, _ = _logits_and_cache(split[0], ids)
    np.testing.assert_array_equal(got, expected)


def test_a_decode_step_after_a_prompt_matches_the_level4_graph_bit_for_bit(quantized, split):
    ids = np.random.default_rng(3).integers(5, 1000, (1, 2 * LIMIT + 1))
    _, cache = _logits_and_cache(quantized, ids[:, :-1])
    expected, _ = _logits_and_cache(quantized, ids[:, -1:], 2 * LIMIT, cache)
    got, _ = _logits_and_cache(split[0], ids[:, -1:], 2 * LIMIT, cache)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("batch,tokens", [(1, LIMIT + 1), (2, LIMIT // 2 + 1), (1, 3 * LIMIT)])
def test_longer_calls_run_the_float_compute_kernels(quantized, split, tmp_path, batch, tokens):
    level0 = _with_level(quantized, 0, tmp_path / "level0.onnx")
    ids = np.random.default_rng(batch * 100 + tokens).integers(5, 1000, (batch, tokens))
    expected, expected_cache = _logits_and_cache(level0, ids)
    got, cache = _logits_and_cache(split[0], ids)
    np.testing.assert_array_equal(got, expected)
    for name in expected_cache:
        np.testing.assert_array_equal(cache[name], expected_cache[name])
    level4, _ = _logits_and_cache(quantized, ids)
    assert not np.array_equal(got, level4)  # the branch taken is not the decode one


def test_the_error_it_reports_is_the_prompt_branch_s_against_the_graph_before(split):
    _, report = split
    assert 0 < report.error < 0.05


@pytest.mark.parametrize("prompt_seconds,split_expected", [(0.97, False), (0.9, True)])
def test_by_default_it_splits_only_where_the_prompt_branch_is_faster_on_this_host(
        quantized, monkeypatch, prompt_seconds, split_expected):
    monkeypatch.setattr(prefill_path, "time_alternating", lambda runs, **_: {"decode": 1.0, "prompt": prompt_seconds})
    model = load_model(quantized)
    report = build_pass("prefill_path", {"max_decode_tokens": LIMIT, "probe_tokens": 64}).run(model, _context(model))
    assert report.modified == split_expected == ("If" in {n.op_type for n in model.graph})
    assert report.details["prompt_ms_prompt_kernels"] == 1e3 * prompt_seconds
    assert split_expected or "left as it was" in report.details["note"]


def test_nothing_to_retarget_leaves_the_model_as_it_was():
    model = load_model(tiny_model("llama", with_past=True))
    outcome = split_prefill(model)
    assert not outcome.modified and "nothing to run differently" in outcome.details["note"]
    assert "If" not in {n.op_type for n in model.graph}


def test_a_split_model_is_not_split_again(split):
    model = load_model(split[0])
    outcome = split_prefill(model)
    assert not outcome.modified and "already" in outcome.details["note"]


def test_a_model_without_token_ids_is_refused_in_one_line(quantized):
    model = load_model(quantized)
    next(v for v in model.graph.inputs if v.name == "input_ids").name = "tokens"
    with pytest.raises(OnnxpressError, match="no 'input_ids' input"):
        split_prefill(model)


@pytest.mark.parametrize(
    "settings,field",
    [({"max_decode_tokens": 0}, "'max_decode_tokens'"), ({"accuracy_level": 5}, "'accuracy_level'"),
     ({"bits": [3]}, "'bits'"), ({"max_decode_tokens": 64, "probe_tokens": 64}, "'probe_tokens'"),
     ({"min_gain": 1}, "'min_gain'"), ({"when": "sometimes"}, "'when'")],
)
def test_bad_settings_name_the_field(settings, field):
    with pytest.raises(OnnxpressError, match=field):
        build_pass("prefill_path", settings)


def test_perplexity_in_decode_sized_chunks_is_the_decode_kernels_and_in_one_call_the_prompt_ones(
        quantized, split, tmp_path):
    level0 = _with_level(quantized, 0, tmp_path / "level0.onnx")
    windows = np.random.default_rng(5).integers(5, 1000, (2, 4 * LIMIT))
    # one window at a time: the limit counts the tokens of the whole batch
    stepped = window_nll(split[0], windows, batch_size=1, chunk=LIMIT)
    assert stepped == window_nll(quantized, windows, batch_size=1, chunk=LIMIT)
    assert window_nll(split[0], windows, batch_size=2, chunk=LIMIT) == window_nll(level0, windows, batch_size=2,
                                                                                  chunk=LIMIT)
    assert window_nll(split[0], windows) == window_nll(level0, windows)


def test_a_probe_prompt_that_does_not_run_is_refused_in_one_line(quantized, monkeypatch):
    def fail(runs, **_):
        raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : position out of range\nmore detail")

    monkeypatch.setattr(prefill_path, "time_alternating", fail)
    model = load_model(quantized)
    with pytest.raises(OnnxpressError, match=r"128-token prompt did not run \(.*position out of range\): set "
                                             "probe_tokens within the model's context length$"):
        build_pass("prefill_path", {"max_decode_tokens": LIMIT}).run(model, _context(model))
    assert "If" not in {n.op_type for n in model.graph}


def test_no_other_pass_may_follow_a_split(quantized, split):
    model = load_model(quantized)
    after_it = Pipeline([build_pass("prefill_path"), build_pass("quantize")])
    with pytest.raises(OnnxpressError, match="^quantize: comes after prefill_path, .*: put prefill_path last$"):
        after_it.check_applicable(model, _context(model))
    split_model = load_model(split[0])
    with pytest.raises(OnnxpressError, match="^cleanup: split.onnx is split into prompt and decode branches "
                                             r"\(prefill_path\), .*: compile the model it was made from$"):
        Pipeline([build_pass("cleanup")]).check_applicable(split_model, _context(model), "split.onnx")
    Pipeline([build_pass("prefill_path")]).check_applicable(split_model, _context(model))  # a no-op, allowed


def test_genai_and_optimum_decode_our_greedy_tokens_through_both_branches(split, tmp_path):
    """The prompt (longer than the limit) takes the prompt branch, each new token the decode one."""
    model = tmp_path / "model.onnx"
    shutil.copy(split[0], model)
    write_runtime_files(model, source_dir=tiny_model("llama", with_past=True).parent)
    prompt, new = list(range(40, 40 + 3 * LIMIT)), 12
    eos = sorted(eos_token_ids(tmp_path))
    ours = DecoderRunner(model, threads=1).generate(prompt, new, eos_ids=eos).tokens
    assert genai_runner(tmp_path)(prompt, new) == ours
    assert optimum_runner(model, eos)(prompt, new) == ours
