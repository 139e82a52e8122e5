"""Tests of the low-rank pass: the rewrite on a hand-built MatMul/Gemm graph, and the whole
pass on tiny exported transformers (checked in ORT)."""

from __future__ import annotations

import numpy as np
import pytest

from onnxpress import factorization as fz
from onnxpress.analysis.matrices import ROLES, select_matrices
from onnxpress.editing import split_matrix
from onnxpress.errors import OnnxpressError

from tiny_models import random_token_batches, random_token_context

# ---------------------------------------------------------------------------- rewrite on a hand-built graph


def _handbuilt(dtype=np.float32, seed=0):
    """x -> MatMul+Add -> Relu -> Gemm(transB, alpha, beta) -> Relu -> MatMul -> y, plus a
    [32, 1] MatMul no split can ever make cheaper."""
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    arrays = {
        "w1": rng.standard_normal((16, 32)), "b1": rng.standard_normal(32),
        "w2": rng.standard_normal((24, 32)) / 4, "c2": rng.standard_normal(24),  # Gemm transB: [d_out, d_in]
        "w3": rng.standard_normal((24, 20)) / 4, "w4": rng.standard_normal((32, 1)),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        helper.make_node("Gemm", ["r1", "w2", "c2"], ["g2"], name="gemm2", transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Relu", ["g2"], ["r2"], name="relu2"),
        helper.make_node("MatMul", ["r2", "w3"], ["y"], name="mm3"),
        helper.make_node("MatMul", ["r1", "w4"], ["z"], name="thin"),
    ]
    graph = helper.make_graph(
        nodes, "handbuilt", [helper.make_tensor_value_info("x", elem, ["n", 16])],
        [helper.make_tensor_value_info("y", elem, ["n", 20]), helper.make_tensor_value_info("z", elem, ["n", 1])],
        [numpy_helper.from_array(a.astype(dtype), n) for n, a in arrays.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    batches = [{"x": (rng.standard_normal((64, 16)) @ np.diag(np.logspace(0, -1.5, 16))).astype(dtype)}
               for _ in range(4)]
    return proto, batches


def _ctx(model, batches, outputs=None):
    from types import SimpleNamespace

    from onnxpress.pipeline import CompileContext

    ctx = CompileContext(verification=batches[:1], calibration=SimpleNamespace(batches=batches), threads=1)
    ctx.output_names = outputs or [v.name for v in model.graph.outputs]
    ctx.reference = ctx.run(model)
    return ctx


def test_full_rank_split_of_matmul_and_gemm_is_exact():
    import onnx_ir as ir


    for dtype, tol in ((np.float32, 1e-5), (np.float16, 2e-3)):
        proto, batches = _handbuilt(dtype)
        model = ir.from_proto(proto)
        ctx = _ctx(model, batches)
        matrices = select_matrices(model, ["mm1", "gemm2", "mm3"])
        assert sorted(m.key for m in matrices) == ["gemm2", "mm1", "mm3"]
        for m in matrices:
            a, b = fz.decompose(m.weight).factors(min(m.d_in, m.d_out))
            split_matrix(model.graph, m, a, b, m.bias)
        ops = [n.op_type for n in model.graph]
        assert "Gemm" not in ops and ops.count("MatMul") == 7
        assert all(v.const_value.dtype.numpy() == dtype for v in model.graph.initializers.values())
        assert ctx.measure(model).rel_l2 < tol


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"method": "plain"},
        {"allocation": "global", "sequential": False},
        {"allocation": "probe"},
        {"refit_prior": 1.0},
        {"sequential": False, "bias_correction": False},
    ],
)
def test_pass_on_handbuilt_graph_reports_the_measured_error(settings):
    import onnx
    import onnx_ir as ir

    from onnxpress.fidelity import compare_outputs
    from onnxpress.model_io import model_proto
    from onnxpress.passes.lowrank import LowRankPass
    from onnxpress.runtime import make_session, run_batches

    proto, batches = _handbuilt()
    model = ir.from_proto(proto)
    ctx = _ctx(model, batches, outputs=["y"])
    outcome = LowRankPass({"fraction": 0.3, "include": ["^mm", "gemm", "thin"], **settings}).apply(model, ctx)
    ranks = outcome.details["ranks"]
    assert "thin" not in ranks  # [32, 1]: two factors always cost more
    for r in ranks.values():
        d_in, d_out = r["shape"]
        assert r["rank"] * (d_in + d_out) < d_in * d_out
    assert outcome.details["fraction_saved"] >= 0.29
    saved = model_proto(model)
    onnx.checker.check_model(saved)
    outputs = run_batches(make_session(saved.SerializeToString()), batches, ["y"])
    measured = compare_outputs(run_batches(make_session(proto.SerializeToString()), batches, ["y"]), outputs)
    assert 0 < measured.rel_l2 < 0.6
    # mm3 produces y, so its fitted error on calibration data is the end-to-end error there
    # (exact when fitted sequentially, or when it is the only thing that changed the inputs of y)
    if settings.get("sequential", True) and settings.get("method") != "plain":
        assert np.isclose(ranks["mm3"]["fit_error"], measured.rel_l2, rtol=1e-3)


def test_whitened_beats_plain_end_to_end_on_handbuilt_graph():
    import onnx_ir as ir

    from onnxpress.passes.lowrank import LowRankPass

    errors = {}
    for method in ("plain", "whitened"):
        proto, batches = _handbuilt()
        model = ir.from_proto(proto)
        ctx = _ctx(model, batches, outputs=["y"])
        LowRankPass({"fraction": 0.3, "include": [".*"], "method": method}).apply(model, ctx)
        errors[method] = ctx.measure(model).rel_l2
    assert errors["whitened"] < 0.7 * errors["plain"]


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"fraction": 0.0}, "'fraction'"),
        ({"fraction": 1.5}, "'fraction'"),
        ({"fraction": "lots"}, "'fraction'"),
        ({"method": "svd++"}, "'method'"),
        ({"allocation": "magic"}, "'allocation'"),
        ({"target": "flops"}, "'target'"),
        ({"include": []}, "'include'"),
        ({"include": ["ffn.up", "(unclosed"]}, "'include'"),
        ({"eps": -1}, "'eps'"),
        ({"max_batches": 0}, "'max_batches'"),
        ({"refit_prior": -1}, "'refit_prior'"),
        ({"probe_samples": 0}, "'probe_samples'"),
        ({"rank": 3}, "unknown setting 'rank'"),
    ],
)
def test_config_errors_are_one_line(settings, words):
    from onnxpress.pass_infra import build_pass

    with pytest.raises(OnnxpressError) as err:
        build_pass("lowrank", settings)
    message = str(err.value)
    assert "\n" not in message and words in message and message.startswith("lowrank")


# ---------------------------------------------------------------------------- tiny exported transformers

TINY = [
    ("bert", False),
    ("distilbert", False),
    ("gpt2", False),  # packed QKV (attn.qkv), Conv1D MatMul + Add
    ("llama", True),  # decoder with KV cache
    ("qwen2", True),  # grouped-query attention, q/k/v biases, KV cache
]


def _tiny(arch, with_past):
    from onnxpress.model_io import load_model
    from tests.tiny_models import tiny_model

    path = tiny_model(arch, with_past=with_past)
    return path, load_model(path)


@pytest.mark.parametrize("arch, with_past", TINY)
def test_full_rank_split_of_every_role_is_exact(arch, with_past):

    _, model = _tiny(arch, with_past)
    ctx = random_token_context(model)
    matrices = select_matrices(model, list(ROLES), ctx.analysis(model))
    assert len(matrices) >= 8  # two layers, attention and FFN
    for m in matrices:
        a, b = fz.decompose(m.weight).factors(min(m.d_in, m.d_out))
        split_matrix(model.graph, m, a, b, m.bias)
    assert ctx.measure(model).rel_l2 < 1e-4


@pytest.mark.parametrize("arch, with_past", TINY)
def test_pass_reports_the_error_measured_on_the_saved_model(arch, with_past, tmp_path):
    from onnxpress.fidelity import compare_outputs
    from onnxpress.model_io import save_model
    from onnxpress.passes.lowrank import LowRankPass
    from onnxpress.runtime import make_session, run_batches

    path, model = _tiny(arch, with_past)
    ctx = random_token_context(model)
    # every role split (uniform): sequential fits with the residual correction of attention O and FFN down
    result = LowRankPass({"fraction": 0.3, "include": list(ROLES), "allocation": "uniform"}).run(model, ctx)
    assert result.modified and result.changes["matrices_split"] >= 8
    assert result.params_after < result.params_before and result.macs_after < result.macs_before
    for info in result.details["ranks"].values():  # never a split that adds MACs
        d_in, d_out = info["shape"]
        assert 1 <= info["rank"] and info["rank"] * (d_in + d_out) < d_in * d_out
    out = save_model(model, tmp_path / "split.onnx")
    session = make_session(out)  # loads in ONNX Runtime
    outputs = [o.name for o in session.get_outputs()]
    assert outputs == [o.name for o in make_session(path).get_outputs()]  # KV cache outputs kept
    measured = compare_outputs(ctx.reference, run_batches(session, ctx.verification, ctx.output_names)).rel_l2
    assert 0 < result.error and np.isclose(measured, result.error, rtol=0.02, atol=1e-6)


@pytest.mark.parametrize("arch, with_past", [("bert", False), ("gpt2", False), ("llama", True)])
def test_probe_loss_is_the_loss_of_the_split_model(arch, with_past):
    """The allocation probes feed trial factors to one shared session; their loss must be the
    loss of the model actually split that way (in ORT): on an encoder fed a mask, 1 - mean
    cosine of the mask-pooled embeddings; on decoders, the relative squared output error."""
    from onnxpress.activations import token_rows
    from onnxpress.fidelity import mean_pool, row_cosines
    from onnxpress.model_io import model_proto
    from onnxpress.runtime import make_session, session_feeds
    from onnxpress.weight_probe import Prober

    path, model = _tiny(arch, with_past)
    ctx = random_token_context(model)
    batches = list(ctx.calibration.batches)[:2]
    matrices = select_matrices(model, list(ROLES), ctx.analysis(model))
    prober = Prober(model, matrices, batches, ctx.output_names, threads=1)
    assert prober.loss({}) == pytest.approx(0.0, abs=1e-12)
    trial = {}
    for i in (0, len(matrices) - 1):
        m = matrices[i]
        a, b = fz.decompose(m.weight).factors(2)
        trial[i] = (a, b, np.full(m.d_out, 0.1) if m.bias is None else m.bias + 0.1)
        split_matrix(model.graph, m, *trial[i])
    before, after = make_session(path), make_session(model_proto(model).SerializeToString())
    err = total = 0.0
    cosines = []
    for feeds in batches:
        runs = [s.run(ctx.output_names, session_feeds(s, feeds)) for s in (before, after)]
        if arch == "bert":
            y0, y1 = (mean_pool(run[0], feeds["attention_mask"]) for run in runs)
            cosines.append(row_cosines(y0, y1))
            continue
        for y0, y1 in zip(*runs, strict=True):
            y0, y1 = (token_rows(y, feeds.get("attention_mask")).astype(np.float64) for y in (y0, y1))
            err, total = err + np.sum((y1 - y0) ** 2), total + np.sum(y0**2)
    expected = 1.0 - np.concatenate(cosines).mean() if arch == "bert" else err / total
    assert expected > 0 and np.isclose(prober.loss(trial), expected, rtol=1e-4)


def test_trimmed_padding_leaves_the_real_tokens_unchanged():
    """Calibration batches of short sentences padded to max_length are cut after their last real
    token: the real tokens' outputs are the same in ORT; a non-empty KV cache is left alone."""
    from onnxpress.activations import token_rows
    from onnxpress.calibration import trim_padding
    from onnxpress.runtime import make_session, session_feeds

    path, model = _tiny("bert", False)
    (feeds,) = random_token_batches(model, 1, 3, 20, seed=1)
    feeds["attention_mask"][:, 12:] = 0
    feeds["attention_mask"][1, 9:] = 0
    cut = trim_padding(feeds)
    assert all(a.shape[1] == 12 for a in cut.values())
    session = make_session(path)
    full, short = (session.run(None, session_feeds(session, f))[0] for f in (feeds, cut))
    np.testing.assert_allclose(token_rows(short, cut["attention_mask"]), token_rows(full, feeds["attention_mask"]),
                               atol=1e-5)
    past = {**feeds, "past": np.zeros((3, 2, 4, 8), np.float32)}
    assert trim_padding(past) is past


def test_compile_model_with_lowrank_verifies_the_stage(tmp_path):
    from onnxpress.compile import compile_model
    from tests.tiny_models import tiny_model

    path = tiny_model("llama", with_past=True)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", input_ids=rng.integers(5, 1000, (24, 20)))
    report = compile_model(path, tmp_path / "out.onnx", passes=["lowrank:fraction=0.25,include=ffn.up|ffn.down|attn.o"],
                           calib=[tmp_path / "calib.npz"], progress=False, threads=1)
    (row,) = report.passes
    assert row.modified and row.measured_error is not None
    assert row.measured_error <= row.error * 1.02 + 1e-6
    assert all(k.split(".", 1)[1] in ("ffn.up", "ffn.down", "attn.o") for k in row.details["ranks"])
    assert row.details["fraction_saved"] >= 0.25


def test_matrices_that_cannot_shrink_are_never_split():
    """At a tiny budget the global allocation splits only where it pays; a [64, 1] or
    similar matrix (break-even rank 0) is never a candidate."""
    from onnxpress.passes.lowrank import LowRankPass

    _, model = _tiny("bert", False)
    ctx = random_token_context(model)
    outcome = LowRankPass({"fraction": 0.02, "allocation": "global", "sequential": False}).apply(model, ctx)
    assert 1 <= outcome.changes["matrices_split"] < 8
    for info in outcome.details["ranks"].values():
        d_in, d_out = info["shape"]
        assert info["rank"] * (d_in + d_out) < d_in * d_out


@pytest.mark.parametrize("order", [("prune_ffn", "prune_heads", "lowrank"), ("lowrank", "prune_ffn", "prune_heads")])
def test_composes_with_pruning_in_either_order(order, tmp_path):
    """Pruning then splitting, and splitting then pruning: every stage changes the model,
    and the pass manager's checks (its reported error against the saved model) pass."""
    from onnxpress.model_io import save_model
    from onnxpress.pass_infra import build_pass
    from onnxpress.pipeline import Pipeline
    from onnxpress.runtime import make_session

    _, model = _tiny("llama", True)
    ctx = random_token_context(model)
    passes = [build_pass(name, {"fraction": 0.2 if name == "lowrank" else 0.25}) for name in order]
    results = Pipeline(passes, progress=False).run(model, ctx)
    for result in results:
        assert result.modified and result.params_after < result.params_before
        assert result.measured_error is not None and result.measured_error <= result.error * 1.02 + 1e-6
    split = next(r for r in results if r.name == "lowrank")
    # the default offers every attention and FFN matrix to the probe allocation, for 20% of ALL
    # the linear parameters (scope "linear")
    assert split.details["allocation"] == "probe" and split.changes["matrices_split"] >= 1
    assert split.details["scope"] == "linear" and split.details["fraction_saved"] >= 0.2
    assert split.details["fraction_saved_of_selected"] == split.details["fraction_saved"]
    make_session(save_model(model, tmp_path / "out.onnx"))  # loads in ONNX Runtime


def test_budget_beyond_the_selected_matrices_is_a_one_line_error():
    """scope "linear": 90% of all linear parameters cannot come from the FFN matrices alone."""
    from onnxpress.passes.lowrank import LowRankPass

    _, model = _tiny("bert", False)
    ctx = random_token_context(model)
    ffn = ["ffn.up", "ffn.gate", "ffn.down"]
    with pytest.raises(OnnxpressError, match="include more roles") as info:
        LowRankPass({"fraction": 0.9, "include": ffn}).apply(model, ctx)
    assert "\n" not in str(info.value)
    outcome = LowRankPass({"fraction": 0.2, "scope": "selected", "sequential": False, "include": ffn}).apply(model, ctx)
    assert outcome.details["fraction_saved"] == outcome.details["fraction_saved_of_selected"] >= 0.2


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_residual_add_found_for_pruning_and_lowrank(arch):
    """One search finds where attention O / FFN down join the residual stream: pruning reads the
    Add's output, the low-rank fit its other input (only when the Add reads the projection itself,
    so not through GPT-2's Reshape); in ORT the Add's output is that stream plus the projection's."""
    from onnxpress.activations import capture
    from onnxpress.analysis.matrices import residual_add
    from onnxpress.passes.lowrank.fit import residual_of
    from onnxpress.passes.prune.scoring import residual_output

    _, model = _tiny(arch, False)
    ctx = random_token_context(model)
    tmap = ctx.analysis(model)
    matrices = {m.node.name: m for m in select_matrices(model, ["attn.o", "ffn.down"], tmap)}
    triples = []
    for layer in tmap.layers:
        for lin in (layer.attention.o, layer.ffn.down):
            join = residual_add(lin.output, layer.residual_adds)
            assert join is not None and join.stream is not None
            assert residual_output(lin, layer) is join.add.outputs[0]
            direct = join.add in [node for node, _ in lin.output.uses()]
            assert residual_of(matrices[lin.node.name]) is (join.stream if direct else None)
            assert direct == (arch != "gpt2")
            triples.append((lin.output.name, join.stream.name, join.add.outputs[0].name))
    got = {}
    names = sorted({n for t in triples for n in t})
    capture(model, names, ctx.calibration.batches[:1], lambda name, array, feeds: got.__setitem__(name, array))
    for out, stream, total in triples:
        np.testing.assert_allclose(got[total], got[stream] + got[out].reshape(got[total].shape), rtol=1e-5, atol=1e-5)
