"""onnxpress.activations: streaming capture of intermediate tensors and the accumulators."""

from __future__ import annotations

import os
import weakref

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import onnx_ir as ir  # noqa: E402
import pytest  # noqa: E402
from test_calibration import TEXTS  # noqa: E402
from test_export import tiny_export  # noqa: E402

from onnxpress import activations  # noqa: E402
from onnxpress.activations import (  # noqa: E402
    ChannelStats,
    CrossStats,
    Gram,
    Tap,
    capture,
    capture_grams,
    token_rows,
    with_outputs,
)
from onnxpress.calibration import CalibrationSet  # noqa: E402
from onnxpress.errors import OnnxpressError  # noqa: E402
from onnxpress.model_io import session_model  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    path = tiny_export("bert")
    model = ir.load(path)
    calib = CalibrationSet.from_texts(TEXTS * 2, path.parent, model, batch_size=4, max_length=24)
    matmuls = [n for n in model.graph if n.op_type == "MatMul"]
    x_name = matmuls[0].inputs[0].name  # a LayerNorm output: [batch, seq, hidden]
    y_name = matmuls[0].outputs[0].name  # the first projection's output
    return model, calib, x_name, y_name


def _collect(model, calib, names):
    """All captured arrays and masks, kept in a list: the reference the accumulators must match."""
    got = {n: [] for n in names}

    def keep(name, array, feeds):
        got[name].append(token_rows(array.copy(), feeds["attention_mask"]))

    capture(model, names, calib, keep)
    return {n: np.concatenate(v).astype(np.float64) for n, v in got.items()}


def test_gram_and_cross_stats_equal_numpy(setup):
    model, calib, x_name, y_name = setup
    gram, cross = Gram(x_name), CrossStats(x_name, y_name)
    capture(model, None, calib, [gram, cross])
    ref = _collect(model, calib, [x_name, y_name])
    x, y = ref[x_name], ref[y_name]
    assert gram.count == calib.num_tokens == len(x)  # padding dropped
    np.testing.assert_allclose(gram.xtx, x.T @ x, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(gram.mean, x.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(gram.covariance(), np.cov(x.T, bias=True), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(cross.xty, x.T @ y, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(cross.y_sum, y.sum(0), rtol=1e-9, atol=1e-9)
    assert cross.count == len(y)


def test_channel_stats_equal_numpy(setup):
    model, calib, x_name, _ = setup
    stats = ChannelStats(x_name, bins=512)
    capture(model, [x_name], calib, stats)
    x = _collect(model, calib, [x_name])[x_name]
    np.testing.assert_allclose(stats.min, x.min(0), rtol=1e-6)
    np.testing.assert_allclose(stats.max, x.max(0), rtol=1e-6)
    np.testing.assert_allclose(stats.absmax, np.abs(x).max(0), rtol=1e-6)
    np.testing.assert_allclose(stats.mean, x.mean(0), atol=1e-9)
    np.testing.assert_allclose(stats.mean_square, (x * x).mean(0), rtol=1e-9)
    assert stats.hist.sum() == x.size
    width = stats.hist_range / stats.bins
    for q in (50.0, 99.0, 100.0):
        assert abs(stats.percentile(q) - np.percentile(np.abs(x), q)) <= width + 1e-9


def test_histogram_range_doubles_exactly():
    stats = ChannelStats("t", bins=8)
    stats.update({"t": np.array([[0.1], [0.9]])})
    stats.update({"t": np.array([[3.5]])})  # range grows 0.9 -> 1.8 -> 3.6
    assert stats.hist_range == pytest.approx(3.6)
    assert stats.hist.sum() == 3 and stats.hist[-1] == 1 and stats.hist[0] == 1


def test_capture_keeps_no_activations_and_leaves_model_alone(setup):
    model, calib, x_name, y_name = setup
    before = session_model(model).proto
    outputs = [v.name for v in model.graph.outputs]
    refs = []
    capture(model, [x_name, y_name], calib, lambda name, array, feeds: refs.append(weakref.ref(array)))
    assert len(refs) == 2 * len(calib)
    assert all(r() is None for r in refs)  # every captured array was released: memory is one batch
    assert [v.name for v in model.graph.outputs] == outputs
    assert session_model(model).proto == before


def test_token_rows_drops_padding():
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    x = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    np.testing.assert_array_equal(token_rows(x, mask), x[[0, 0, 1], [0, 1, 0]])
    np.testing.assert_array_equal(token_rows(x.reshape(6, 4), mask), x.reshape(6, 4)[[0, 1, 3]])
    heads = np.zeros((2, 5, 3, 4))  # [batch, heads, seq, d]: leading dims are not [batch, seq]
    assert token_rows(heads, mask).shape == (30, 4)
    assert token_rows(x, None).shape == (6, 4)
    # with a KV cache the mask covers past + new tokens; the tensor holds the new ones (the last)
    past_mask = np.array([[0, 1, 1, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(token_rows(x[:, :2], past_mask), x[[0, 1, 1], [0, 0, 1]])


def test_unknown_tensor_is_one_line_error(setup):
    model, calib, _, _ = setup
    with pytest.raises(OnnxpressError, match="'no/such/tensor' is not in the model") as exc:
        capture(model, ["no/such/tensor"], calib, Gram("no/such/tensor"))
    assert "\n" not in str(exc.value)


def _session_count(monkeypatch) -> list[int]:
    made = []
    real = activations.make_session

    def counting(*args, **kwargs):
        made.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(activations, "make_session", counting)
    return made


def _tensor_names(model, count):
    """Node outputs of the first MatMuls' inputs and outputs: float [batch, seq, ...] tensors."""
    names = []
    for node in model.graph:
        if node.op_type == "MatMul" and len(names) < count:
            names += [v.name for v in (node.inputs[0], node.outputs[0]) if v.name not in names]
    return names[:count]


def test_chunks_give_the_statistics_of_one_chunk(setup, monkeypatch):
    """One session per chunk, an accumulator's tensors in one chunk, and the same numbers."""
    model, calib, x_name, y_name = setup
    names = _tensor_names(model, 5)

    def stats(chunk):
        grams = [Gram(n) for n in names]
        cross = CrossStats(x_name, y_name)
        capture(model, None, calib, [*grams, cross], chunk=chunk)
        return grams, cross

    made = _session_count(monkeypatch)
    one_grams, one_cross = stats(None)
    assert len(made) == 1
    made.clear()
    grams, cross = stats(2)
    assert len(made) == 4  # 2 tensors a session, the pair together: {a, b} {c, d} {e} {x, y}
    for got, want in zip(grams, one_grams, strict=True):
        assert got.count == want.count
        np.testing.assert_allclose(got.xtx, want.xtx, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got.sum, want.sum, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(cross.xty, one_cross.xty, rtol=1e-6, atol=1e-6)

    raw: dict[str, int] = {}
    made.clear()
    capture(model, names, calib, lambda name, array, feeds: raw.__setitem__(name, raw.get(name, 0) + 1), chunk=2)
    assert len(made) == 3 and raw == {n: len(calib) for n in names}  # each tensor once per batch


def test_pruned_copy_gives_the_same_tensors(setup):
    model, calib, x_name, y_name = setup
    import onnx

    names = [x_name, y_name]
    full, pruned = {}, {}
    capture(model, names, calib.take(2), lambda n, a, f: full.setdefault(n, []).append(a.copy()))
    capture(model, names, calib.take(2), lambda n, a, f: pruned.setdefault(n, []).append(a.copy()), prune=True)
    for n in names:
        for a, b in zip(full[n], pruned[n], strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
    cut = onnx.load_from_string(with_outputs(model, names, prune=True).proto)
    assert [o.name for o in cut.graph.output] == names
    assert len(cut.graph.node) < len(model.graph) / 2  # only the first layer's projection runs
    cut_gram, full_gram = (capture_grams(model, calib, [y_name], prune=p).grams[y_name] for p in (True, False))
    assert cut_gram.count == full_gram.count
    np.testing.assert_allclose(cut_gram.xtx, full_gram.xtx, rtol=1e-6, atol=1e-6)


def _weight_input_model():
    """y = x @ w with the weight w a graph input (as the low-rank probes feed trial factors)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, "r"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def test_extra_feeds_reach_every_batch():
    model = _weight_input_model()
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((2, 3, 4)).astype(np.float32),
                "attention_mask": np.array([[1, 1, 1], [1, 1, 0]])} for _ in range(2)]
    w = rng.standard_normal((4, 5)).astype(np.float32)
    gram = Gram("h")
    capture(model, None, batches, gram, feeds={"w": w})
    h = np.concatenate([token_rows(b["x"] @ w, b["attention_mask"]) for b in batches]).astype(np.float64)
    assert gram.count == 10
    np.testing.assert_allclose(gram.xtx, h.T @ h, rtol=1e-5, atol=1e-5)

    tap = Tap(model, ["y"])  # one session, run with other feeds: a batch's own w is overridden
    got = []
    for trial in (w, 2 * w):
        got.clear()
        tap.stream([{**b, "w": np.zeros_like(w)} for b in batches], lambda n, a, f: got.append(a), feeds={"w": trial})
        np.testing.assert_allclose(got[0], np.maximum(batches[0]["x"] @ trial, 0), rtol=1e-5, atol=1e-6)


def test_gram_scaled_equals_the_gram_of_scaled_rows():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 6))
    s = rng.uniform(0.5, 3.0, 6)
    got, want = Gram.of(x).scaled(s), Gram.of(x / s)
    np.testing.assert_allclose(got.xtx, want.xtx, rtol=1e-12)
    np.testing.assert_allclose(got.mean, want.mean, rtol=1e-12)
    assert got.count == want.count
    with pytest.raises(ValueError):
        Gram.of(x, x).scaled(s)
