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

from onnxpress.activations import ChannelStats, CrossStats, Gram, capture, token_rows  # noqa: E402
from onnxpress.calibration import CalibrationSet  # noqa: E402
from onnxpress.errors import OnnxpressError  # noqa: E402
from onnxpress.model_io import model_bytes  # noqa: E402


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
    before = model_bytes(model)
    outputs = [v.name for v in model.graph.outputs]
    refs = []
    capture(model, [x_name, y_name], calib, lambda name, array, feeds: refs.append(weakref.ref(array)))
    assert len(refs) == 2 * len(calib)
    assert all(r() is None for r in refs)  # every captured array was released: memory is one batch
    assert [v.name for v in model.graph.outputs] == outputs
    assert model_bytes(model) == before


def test_token_rows_drops_padding():
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    x = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    np.testing.assert_array_equal(token_rows(x, mask), x[[0, 0, 1], [0, 1, 0]])
    np.testing.assert_array_equal(token_rows(x.reshape(6, 4), mask), x.reshape(6, 4)[[0, 1, 3]])
    heads = np.zeros((2, 5, 3, 4))  # [batch, heads, seq, d]: leading dims are not [batch, seq]
    assert token_rows(heads, mask).shape == (30, 4)
    assert token_rows(x, None).shape == (6, 4)


def test_unknown_tensor_is_one_line_error(setup):
    model, calib, _, _ = setup
    with pytest.raises(OnnxpressError, match="'no/such/tensor' is not in the model") as exc:
        capture(model, ["no/such/tensor"], calib, Gram("no/such/tensor"))
    assert "\n" not in str(exc.value)
