"""Cross-layer weight sharing: numerics of the group fits, and the pass on tiny random-weight
exports, checked against ONNX Runtime (stored-once tensors, unchanged output at zero sharing,
reported errors = measured errors)."""

from __future__ import annotations

import numpy as np
import pytest

from onnxpress.errors import OnnxpressError
from onnxpress.passes.share_weights import fit as sfit

from tiny_models import random_token_context

# ---------------------------------------------------------------------------- numerics


def _group(rng, n=3, d_in=12, d_out=10, tokens=400):
    mix = rng.standard_normal((d_in, d_in)) @ np.diag(np.logspace(0, -1.5, d_in))
    xs = [rng.standard_normal((tokens, d_in)) @ mix + 0.3 * rng.standard_normal((tokens, d_in)) for _ in range(n)]
    base = rng.standard_normal((d_in, d_out))
    ws = [base + 0.5 * rng.standard_normal((d_in, d_out)) for _ in range(n)]
    return xs, ws


@pytest.mark.parametrize("side", sfit.SIDES)
def test_group_decomposition_is_exact_at_full_rank(side):
    rng = np.random.default_rng(0)
    xs, ws = _group(rng)
    dec = sfit.decompose_group(ws, [x.T @ x for x in xs], side, eps=1e-12)
    full = len(dec.energy)
    for w, w_r in zip(ws, dec.approximations(full), strict=True):
        np.testing.assert_allclose(w_r, w, atol=1e-7)
    shared, parts = dec.factors(4)
    assert shared.shape == ((12, 4) if side == "input" else (4, 10))
    assert all(p.shape == ((4, 10) if side == "input" else (12, 4)) for p in parts)


def test_output_side_energies_are_the_summed_output_errors():
    """Per-layer whitening of the stacked blocks: the dropped singular values are exactly
    sum_i ||X_i (W_i - C_i B)||^2 on the calibration data."""
    rng = np.random.default_rng(1)
    xs, ws = _group(rng)
    dec = sfit.decompose_group(ws, [x.T @ x for x in xs], "output", eps=1e-12)
    for rank in (2, 5):
        err = sum(np.linalg.norm(x @ (w - w_r)) ** 2 for x, w, w_r in zip(xs, ws, dec.approximations(rank),
                                                                            strict=True))
        assert np.isclose(err, dec.energy[rank:].sum(), rtol=1e-6)


def test_tie_base_minimises_summed_error_and_residuals_fix_each_layer():
    rng = np.random.default_rng(2)
    xs, ws = _group(rng)
    grams = [x.T @ x for x in xs]
    base, residuals = sfit.fit_tie(ws, grams, 10, eps=1e-12)

    def err(b):
        return sum(np.linalg.norm(x @ (w - b)) ** 2 for x, w in zip(xs, ws, strict=True))

    assert err(base) < err(np.mean(ws, axis=0))  # the whitened mean beats the plain mean
    for w, (a, b) in zip(ws, residuals, strict=True):  # full residual rank: exact
        np.testing.assert_allclose(base + a @ b, w, atol=1e-7)
    assert sfit.tie_cost(3, 12, 10, sfit.tie_rank(3, 12, 10, 500)) <= 500
    assert sfit.tie_rank(3, 12, 10, 100) == 0  # not even the base fits


@pytest.mark.parametrize("side", sfit.SIDES)
def test_similarity_grouping_pairs_layers_that_share_a_subspace(side):
    """Layers 0, 2 (and 1, 3) are built on one common rank-3 subspace on the shared side: they pair up."""
    rng = np.random.default_rng(3)
    d = 16
    spaces = [np.linalg.qr(rng.standard_normal((d, 3)))[0] for _ in range(2)]

    def weight(space):
        w = space @ rng.standard_normal((3, d)) + 0.05 * rng.standard_normal((d, d))
        return w if side == "input" else w.T

    ws = [weight(spaces[i % 2]) for i in range(4)]
    sim = sfit.similarity(ws, [np.eye(d)] * 4, side, keep=0.2)
    assert sfit.similar_groups(sim, 2) == [[0, 2], [1, 3]]
    assert sorted(i for g in sfit.similar_groups(sim, 3) for i in g) == [0, 1, 2, 3]


# ---------------------------------------------------------------------------- the pass on tiny exports


def _tiny(arch, with_past):
    from onnxpress.model_io import load_model
    from tests.tiny_models import tiny_model

    path = tiny_model(arch, with_past=with_past)
    return path, load_model(path)


def _ctx(model):

    return random_token_context(model)


def _run_saved(path, ctx):
    from onnxpress.fidelity import compare_outputs
    from onnxpress.runtime import make_session, run_batches

    return compare_outputs(ctx.reference, run_batches(make_session(path), ctx.verification, ctx.output_names)).rel_l2


def test_zero_sharing_leaves_the_output_unchanged(tmp_path):
    from onnxpress.model_io import save_model
    from onnxpress.passes.share_weights import ShareWeightsPass

    path, model = _tiny("llama", True)
    ctx = _ctx(model)
    result = ShareWeightsPass({"fraction": 0.0}).run(model, ctx)
    assert not result.modified and result.params_after == result.params_before
    assert _run_saved(save_model(model, tmp_path / "same.onnx"), ctx) < 1e-5


@pytest.mark.parametrize("how", ["input", "output", "tie"])
def test_full_rank_sharing_of_every_role_is_lossless(how):
    """The rewrite alone (one shared initializer, per-layer parts, tied base + residual) at full
    rank: every role of every layer shared in pairs, output unchanged."""
    from onnxpress.analysis.matrices import ROLES, select_matrices
    from onnxpress.passes import share_weights as sw

    _, model = _tiny("llama", True)
    ctx = _ctx(model)
    cfg = sw.ShareWeightsConfig(side="input" if how == "tie" else how, share=list(ROLES))
    groups = sw.make_groups(select_matrices(model, cfg.include, ctx.analysis(model)), cfg)
    assert all(len(g.members) == 2 for g in groups) and len(groups) >= 7
    for g in groups:
        weights = [m.weight for m in g.members]
        grams = [np.eye(m.d_in) for m in g.members]
        biases = [m.bias for m in g.members]
        if how == "tie":
            base, residuals = sfit.fit_tie(weights, grams, min(weights[0].shape), eps=0.0)
            sw.emit_tie(model.graph, g, base, residuals, biases)
        else:
            dec = sfit.decompose_group(weights, grams, g.side, eps=0.0)
            sw.emit_basis(model.graph, g, *dec.factors(len(dec.energy)), biases)
    assert ctx.measure(model).rel_l2 < 1e-5


@pytest.mark.parametrize("arch, with_past, settings", [
    ("llama", True, {"fraction": 0.3, "mode": "basis"}),
    ("bert", False, {"fraction": 0.3, "share": ["attn.q", "ffn.up", "ffn.down"], "grouping": "similar"}),
    ("llama", True, {"fraction": 0.1, "allocation": "uniform", "mode": "tie", "include": ["ffn.up", "ffn.gate"]}),
])
def test_shared_tensors_are_stored_once_and_errors_match_ort(arch, with_past, settings, tmp_path):
    import onnx
    from onnx import numpy_helper

    from onnxpress.model_io import save_model
    from onnxpress.passes.share_weights import ShareWeightsPass
    from onnxpress.runtime import make_session

    path, model = _tiny(arch, with_past)
    ctx = _ctx(model)
    result = ShareWeightsPass(settings).run(model, ctx)
    shared = [g for g in result.details["groups"] if len(g["layers"]) > 1]
    assert result.changes["groups_shared"] == len(shared) >= 1
    assert result.details["fraction_saved"] >= settings["fraction"] * 0.97
    if settings.get("mode") == "tie":
        assert all(g["mode"] == "tie" for g in shared)
    out = save_model(model, tmp_path / "shared.onnx")
    proto = onnx.load(out)
    onnx.checker.check_model(proto)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert len(inits) == len(proto.graph.initializer)  # no name stored twice
    for g in shared:
        users = [n for n in proto.graph.node if g["shared_tensor"] in n.input]
        assert len(users) == len(g["layers"]) and all(n.op_type == "MatMul" for n in users)
        array = inits[g["shared_tensor"]]
        copies = [k for k, v in inits.items() if v.shape == array.shape and np.array_equal(v, array)]
        assert copies == [g["shared_tensor"]]  # one copy in the file
        # bytes of the group: the shared tensor once + the per-layer weights of its nodes
        stems = {n.name.rsplit("/", 1)[0] for n in users}  # the nodes split_matrix / tying made per layer
        per_layer = {i for n in proto.graph.node if n.name.rsplit("/", 1)[0] in stems
                     for i in n.input if i in inits and i != g["shared_tensor"] and inits[i].ndim == 2}
        stored = array.size + sum(inits[i].size for i in per_layer)
        d_in, d_out = g["shape"]
        assert stored == len(g["layers"]) * d_in * d_out - g["params_saved"]
    session = make_session(out)  # ORT loads it
    assert [o.name for o in session.get_outputs()] == [o.name for o in make_session(path).get_outputs()]
    measured = _run_saved(out, ctx)
    assert 0 < result.error and np.isclose(measured, result.error, rtol=0.02, atol=1e-6)


def test_compile_model_with_share_weights_verifies_the_stage(tmp_path):
    """Through the pass manager: ONNX checker, reload in a fresh ORT session, agreement within
    the reported error."""
    from onnxpress.compile import compile_model
    from tests.tiny_models import tiny_model

    path = tiny_model("llama", with_past=True)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", input_ids=rng.integers(5, 1000, (24, 20)))
    report = compile_model(path, tmp_path / "out.onnx", passes=["share_weights:fraction=0.25,share=ffn.up|ffn.gate"],
                           calib=[tmp_path / "calib.npz"], progress=False, threads=1)
    (row,) = report.passes
    assert row.modified and row.measured_error is not None
    assert row.measured_error <= row.error * 1.02 + 1e-6
    assert row.details["fraction_saved"] >= 0.25 and row.params_after < row.params_before


def _subgraph(proto, x_name: str, y_name: str, d_in: int) -> bytes:
    """The nodes of ``proto`` between tensor x_name and tensor y_name, as a model of its own."""
    from onnx import TensorProto, helper

    producers = {o: n for n in proto.graph.node for o in n.output}
    inits = {t.name: t for t in proto.graph.initializer}
    order = {id(n): i for i, n in enumerate(proto.graph.node)}
    needed, stack = {}, [y_name]
    while stack:
        name = stack.pop()
        if name != x_name and name not in inits and name in producers and id(producers[name]) not in needed:
            needed[id(producers[name])] = producers[name]
            stack.extend(producers[name].input)
    nodes = sorted(needed.values(), key=lambda n: order[id(n)])
    used = dict.fromkeys(i for n in nodes for i in n.input if i in inits)
    graph = helper.make_graph(nodes, "sub", [helper.make_tensor_value_info(x_name, TensorProto.FLOAT, [None, d_in])],
                              [helper.make_tensor_value_info(y_name, TensorProto.FLOAT, None)],
                              [inits[i] for i in used])
    return helper.make_model(graph, opset_imports=proto.opset_import, ir_version=proto.ir_version).SerializeToString()


@pytest.mark.parametrize("mode", ["basis", "tie"])
def test_reported_calibration_errors_are_the_measured_ones(mode):
    """Each member's reported error = ||f_new(X_i) - X_i W_i|| / ||X_i W_i|| measured in ORT on the
    calibration tokens, with f_new the rewritten model's subgraph from X_i to the layer's output."""
    from onnxpress.activations import capture, token_rows
    from onnxpress.analysis.matrices import select_matrices
    from onnxpress.model_io import model_proto
    from onnxpress.passes.share_weights import ShareWeightsPass
    from onnxpress.runtime import make_session

    _, model = _tiny("llama", True)
    ctx = _ctx(model)
    settings = {"fraction": 0.1, "allocation": "uniform", "mode": mode, "include": ["ffn.up"], "share": ["ffn.up"]}
    matrices = {m.layer: m for m in select_matrices(model, ["ffn.up"], ctx.analysis(model))}
    # where each ffn.up output goes (consumer node, input slot): those nodes survive the rewrite
    slots = {i: [(n.name, idx) for n, idx in m.node.outputs[0].uses()][0] for i, m in matrices.items()}
    inputs = {i: m.input.name for i, m in matrices.items()}
    rows = {name: [] for name in inputs.values()}
    capture(model, list(rows), ctx.calibration,
            lambda name, arr, feeds: rows[name].append(token_rows(arr, feeds.get("attention_mask"))), threads=1)
    outcome = ShareWeightsPass(settings).apply(model, ctx)
    (group,) = outcome.details["groups"]
    assert group["mode"] == mode and group["layers"] == [0, 1]
    rewritten = model_proto(model)
    nodes = {n.name: n for n in rewritten.graph.node}
    for layer, reported in zip(group["layers"], group["calibration_error"], strict=True):
        node_name, slot = slots[layer]
        y_name = nodes[node_name].input[slot]
        x = np.concatenate(rows[inputs[layer]]).astype(np.float32)
        session = make_session(_subgraph(rewritten, inputs[layer], y_name, x.shape[1]))
        y_new = session.run(None, {inputs[layer]: x})[0].astype(np.float64)
        y_ref = x.astype(np.float64) @ matrices[layer].weight
        measured = np.linalg.norm(y_new - y_ref) / np.linalg.norm(y_ref)
        assert reported > 1e-3 and np.isclose(measured, reported, rtol=1e-3), (layer, measured, reported)


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"fraction": 1.0}, "'fraction'"),
        ({"fraction": -0.1}, "'fraction'"),
        ({"fraction": "lots"}, "'fraction'"),
        ({"include": []}, "'include'"),
        ({"include": ["ffn.upp"]}, "'include'"),
        ({"share": ["layer3"]}, "'share'"),
        ({"group_size": 0}, "'group_size'"),
        ({"grouping": "random"}, "'grouping'"),
        ({"side": "left"}, "'side'"),
        ({"mode": "merge"}, "'mode'"),
        ({"allocation": "magic"}, "'allocation'"),
        ({"eps": -1}, "'eps'"),
        ({"max_batches": 0}, "'max_batches'"),
        ({"rank": 3}, "unknown setting 'rank'"),
    ],
)
def test_config_errors_are_one_line(settings, words):
    from onnxpress.pass_infra import build_pass

    with pytest.raises(OnnxpressError) as err:
        build_pass("share_weights", settings)
    message = str(err.value)
    assert "\n" not in message and words in message and message.startswith("share_weights")
