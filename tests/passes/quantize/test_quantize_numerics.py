"""Numerics of the quantize pass: ranges, GPTQ, SmoothQuant scales, MatMulNBits packing."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxpress.passes.quantize import weight_only
from onnxpress.passes.quantize.calibrate import (
    StreamingHistogram,
    choose_range,
    choose_range_for_linear,
    expected_mse,
    qparams_from_range,
)
from onnxpress.passes.quantize.capture import TensorStats
from onnxpress.passes.quantize.gptq import (
    BlockQuantizer,
    ChannelQuantizer,
    _inverse_cholesky_upper,
    channel_scales,
    gptq,
)
from onnxpress.passes.quantize.smooth import choose_alpha, smooth_scales
from onnxpress.passes.quantize.weight_only import (
    dequantize_nbits,
    pack_codes,
    quantize_nbits,
    split_columns,
    unpack_codes,
)


def _correlated_inputs(rng, rows: int, k: int) -> np.ndarray:
    mix = rng.standard_normal((k, k)) / np.sqrt(k)
    scales = np.exp(rng.standard_normal(k))  # uneven channel energies, like real activations
    return (rng.standard_normal((rows, k)) @ mix * scales).astype(np.float32)


# -- ranges -------------------------------------------------------------------------------------


def test_histogram_streams_and_merges_without_losing_counts():
    rng = np.random.default_rng(0)
    hist = StreamingHistogram(max_bins=256)
    chunks = [rng.standard_normal(1000) * s for s in (0.1, 1.0, 30.0)]  # range grows: bins merge
    for c in chunks:
        hist.update(c)
    data = np.concatenate(chunks)
    assert hist.counts.sum() == hist.total == data.size
    assert hist.counts.size <= 256
    assert hist.min == pytest.approx(data.min()) and hist.max == pytest.approx(data.max())
    assert choose_range(hist, "minmax", "uint8") == (pytest.approx(data.min()), pytest.approx(data.max()))


def test_percentile_and_mse_ranges_clip_outliers():
    rng = np.random.default_rng(1)
    data = np.concatenate([rng.standard_normal(200_000), [80.0, -60.0]])  # two outliers
    hist = StreamingHistogram()
    hist.update(data)
    lo, hi = choose_range(hist, "percentile", "uint8", percentile=99.99)
    assert 3.0 < hi < 6.0 and -6.0 < lo < -3.0
    lo_m, hi_m = choose_range(hist, "mse", "uint8")
    assert hi_m < 80 and lo_m > -60  # squared error: clips only as far as the rounding noise pays for it
    full = qparams_from_range(data.min(), data.max(), "uint8")
    assert expected_mse(hist, qparams_from_range(lo_m, hi_m, "uint8")) < expected_mse(hist, full)
    lo_e, hi_e = choose_range(hist, "entropy", "uint8")
    assert hi_e < 80 and lo_e > -60


@pytest.mark.parametrize("qtype", ["uint8", "int8"])
def test_qparams_represent_zero_exactly(qtype):
    qp = qparams_from_range(-0.37, 5.1, qtype)
    assert qp.fake_quant(np.zeros(3, np.float32)).tolist() == [0.0, 0.0, 0.0]
    if qtype == "int8":
        assert qp.zero_point == 0  # ORT's s8 kernels want symmetric activations


def test_auto_range_picks_the_candidate_with_least_output_error():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2000, 32)).astype(np.float32)
    x[:, 3] *= 40  # an outlier channel that the weights amplify: clipping it would hurt
    w = rng.standard_normal((32, 16)).astype(np.float32)
    hist = StreamingHistogram()
    hist.update(x)
    chosen, method = choose_range_for_linear(hist, x[:512], [w], "auto", "uint8")
    for name in ("minmax", "percentile", "entropy", "mse"):
        qp = qparams_from_range(*choose_range(hist, name, "uint8"), "uint8")
        err = np.linalg.norm(qp.fake_quant(x[:512]) @ w - x[:512] @ w)
        assert np.linalg.norm(chosen.fake_quant(x[:512]) @ w - x[:512] @ w) <= err + 1e-6, (method, name)


# -- weights ------------------------------------------------------------------------------------


def test_per_channel_scales_are_symmetric_per_output_column():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 10)).astype(np.float32) * np.arange(1, 11)  # columns of different size
    scales = channel_scales(w, 127)
    np.testing.assert_allclose(scales, np.abs(w).max(axis=0) / 127, rtol=1e-6)
    codes = ChannelQuantizer(scales, 127).codes(w)
    assert np.abs(codes).max() == 127 and (np.abs(codes).max(axis=0) == 127).all()
    assert np.abs(codes * scales - w).max() <= scales.max() / 2 + 1e-6


@pytest.mark.parametrize("qmax,act_order", [(127, False), (64, False), (127, True)])
def test_gptq_beats_round_to_nearest_on_layer_output(qmax, act_order):
    rng = np.random.default_rng(4)
    x = _correlated_inputs(rng, 4096, 96)
    w = rng.standard_normal((96, 48)).astype(np.float32)
    scales = channel_scales(w, qmax)
    rtn = ChannelQuantizer(scales, qmax)(0, w.astype(np.float64))
    g = gptq(
        w,
        x.T.astype(np.float64) @ x,
        ChannelQuantizer(scales, qmax),
        block=32,
        damp=0.01,
        act_order=act_order,
    )
    # GPTQ stays on the same integer grid ...
    codes = g / scales
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-6)
    assert np.abs(np.round(codes)).max() <= qmax
    # ... and lowers the output error, not the weight error
    err = lambda q: np.linalg.norm(x @ w - x @ q)  # noqa: E731
    assert err(g) < 0.9 * err(rtn)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_blocks_beats_rtn_for_int4(act_order):
    rng = np.random.default_rng(5)
    x = _correlated_inputs(rng, 4096, 128)
    w = rng.standard_normal((128, 32)).astype(np.float32)
    rtn = quantize_nbits(w, 4, 32)
    gq = quantize_nbits(w, 4, 32, hessian=x.T.astype(np.float64) @ x, act_order=act_order)
    err = lambda q: np.linalg.norm(x @ w - x @ q)  # noqa: E731
    assert err(gq.dequantized) < 0.8 * err(rtn.dequantized)
    np.testing.assert_allclose(dequantize_nbits(gq), gq.dequantized, atol=1e-5)


def test_inverse_cholesky_factor_of_the_hessian():
    rng = np.random.default_rng(8)
    x = _correlated_inputs(rng, 512, 40).astype(np.float64)
    h = x.T @ x + 1e-3 * np.eye(40)
    u = _inverse_cholesky_upper(h)
    assert np.allclose(np.tril(u, -1), 0)
    np.testing.assert_allclose(u.T @ u, np.linalg.inv(h), rtol=1e-8, atol=1e-10)


def test_gptq_of_a_single_input_row():
    """A rank-1 low-rank factor B [1, N] has a 1 x 1 Hessian; GPTQ then is plain rounding."""
    w = np.random.default_rng(10).standard_normal((1, 12)).astype(np.float32)
    scales = channel_scales(w, 127)
    g = gptq(w, np.array([[3.0]]), ChannelQuantizer(scales, 127))
    np.testing.assert_allclose(g, ChannelQuantizer(scales, 127)(0, w.astype(np.float64)), atol=1e-6)


def test_split_columns_of_a_group_quantised_together():
    rng = np.random.default_rng(9)
    w = rng.standard_normal((64, 24)).astype(np.float32)
    nw = quantize_nbits(w, 4, 32)
    part = split_columns(nw, slice(10, 24))
    assert part.N == 14 and part.packed.shape[0] == 14
    np.testing.assert_allclose(dequantize_nbits(part), dequantize_nbits(nw)[:, 10:24])


@pytest.mark.parametrize("symmetric,act_order", [(False, True), (True, False)])
def test_columns_quantised_in_chunks_equal_the_whole_matrix(monkeypatch, symmetric, act_order):
    """GPTQ rounds each column on its own, so quantising column ranges apart (bounded memory on a
    large LM head), without keeping the float copy of the result, gives the kernel the same codes,
    scales and zero points; the weight given is left as it was."""
    rng = np.random.default_rng(3)
    x = _correlated_inputs(rng, 256, 64)
    w = rng.standard_normal((64, 40)).astype(np.float32)
    x[:, 5] = 0.0  # an input that never fires: GPTQ zeroes its weights in its own copy
    given = w.copy()
    settings = dict(symmetric=symmetric, hessian=x.T.astype(np.float64) @ x, act_order=act_order)
    whole = quantize_nbits(w, 4, 16, **settings)
    monkeypatch.setattr(weight_only, "COLUMN_CHUNK", 16)
    chunked = quantize_nbits(w, 4, 16, keep_dequantized=False, **settings)
    np.testing.assert_array_equal(w, given)
    assert chunked.dequantized is None and whole.dequantized is not None
    assert chunked.N == whole.N == 40
    np.testing.assert_array_equal(chunked.packed, whole.packed)
    np.testing.assert_array_equal(chunked.scales, whole.scales)
    if not symmetric:
        np.testing.assert_array_equal(chunked.zero_points, whole.zero_points)
    np.testing.assert_allclose(dequantize_nbits(chunked), whole.dequantized, rtol=1e-6, atol=1e-6)


def test_smoothed_stats_follow_from_the_raw_ones():
    """The Gram, maxima and range of x / s, derived without a second capture, equal a capture of x / s."""
    rng = np.random.default_rng(10)
    x = _correlated_inputs(rng, 300, 16)
    s = rng.uniform(0.2, 5, 16).astype(np.float32)
    raw, direct = (TensorStats("x", gram=True, sample_rows=0) for _ in range(2))
    for chunk in np.array_split(x, 3):
        raw.add(chunk)
        direct.add(chunk / s)
    derived, want = raw.scaled(s), direct
    np.testing.assert_allclose(derived.gram.xtx, want.gram.xtx, rtol=1e-5, atol=1e-6 * np.abs(want.gram.xtx).max())
    np.testing.assert_allclose(derived.gram.mean, want.gram.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(derived.absmax, want.absmax, rtol=1e-6)
    assert derived.hist.min == pytest.approx(want.hist.min, rel=1e-6)
    assert derived.hist.max == pytest.approx(want.hist.max, rel=1e-6)


def test_block_quantizer_zero_is_exact_and_codes_in_range():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((64, 8))
    q = BlockQuantizer(w.shape, 4, 32)
    deq = q.quantize_all(w)
    assert q.q.max() <= 15
    for b in range(2):  # zero maps to an integer code in every block: (z - z) * s == 0
        assert np.all((q.zero_points[b] >= 0) & (q.zero_points[b] <= 15))
    assert np.abs(deq - w).max() < np.abs(w).max() / 7


# -- SmoothQuant --------------------------------------------------------------------------------


def test_smooth_scales_are_exact_in_float_and_flatten_outliers():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((512, 32)).astype(np.float32)
    x[:, 5] *= 50
    w = rng.standard_normal((32, 16)).astype(np.float32)
    s = smooth_scales(np.abs(x).max(axis=0), [w], 0.5)
    np.testing.assert_allclose((x / s) @ (w * s[:, None]), x @ w, rtol=1e-4, atol=1e-3)
    assert np.abs(x / s).max(axis=0).std() < np.abs(x).max(axis=0).std()
    alpha, err, base = choose_alpha(np.abs(x).max(axis=0), x, [w])
    assert alpha is not None and err < base


# -- MatMulNBits layout -------------------------------------------------------------------------


def test_pack_codes_round_trips_low_bits_first():
    codes = np.array([[1, 2, 3, 15, 0]], np.uint8)
    packed = pack_codes(codes, 4)
    assert packed.tolist() == [[0x21, 0xF3, 0x00]]
    np.testing.assert_array_equal(unpack_codes(packed, 4, 5), codes)


def _matmul_nbits_session(nw, options=None) -> ort.InferenceSession:
    """ORT running one MatMulNBits on ``nw``; float16 scales reach it through a Cast, as the pass writes them."""
    inits = [numpy_helper.from_array(nw.packed, "B"), numpy_helper.from_array(nw.scales, "S_stored")]
    inputs = ["A", "B", "S"]
    if nw.zero_points is not None:
        inits.append(numpy_helper.from_array(nw.zero_points, "Z"))
        inputs.append("Z")
    scales = (helper.make_node("Cast", ["S_stored"], ["S"], to=TensorProto.FLOAT) if nw.scales.dtype == np.float16
              else helper.make_node("Identity", ["S_stored"], ["S"]))
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=nw.K, N=nw.N, bits=nw.bits,
                            block_size=nw.block_size)
    graph = helper.make_graph(
        [scales, node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, nw.K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, nw.N])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(
    "bits,k,n,block", [(4, 64, 24, 32), (4, 100, 16, 32), (4, 128, 8, 64), (8, 96, 12, 32), (4, 256, 8, 128)]
)
@pytest.mark.parametrize("symmetric", [False, True])
def test_matmul_nbits_layout_matches_onnxruntime(bits, k, n, block, symmetric):
    rng = np.random.default_rng(8)
    w = rng.standard_normal((k, n)).astype(np.float32)
    nw = quantize_nbits(w, bits, block, symmetric=symmetric)
    a = rng.standard_normal((5, k)).astype(np.float32)
    np.testing.assert_allclose(_matmul_nbits_session(nw).run(None, {"A": a})[0], a @ dequantize_nbits(nw),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dequantize_nbits(nw), nw.dequantized, atol=1e-5)


@pytest.mark.parametrize("symmetric", [False, True])
def test_float16_scales_reach_matmul_nbits_through_a_cast_that_onnxruntime_folds(tmp_path, symmetric):
    """Codes are rounded against the float16 scales, so the kernel (fed the Cast of them)
    computes exactly the reported weight; a block of tiny weights keeps a normal float16 scale;
    ORT folds the Cast into a constant when the session loads."""
    rng = np.random.default_rng(9)
    k, n = 96, 16
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    w[:32, 3] *= 1e-5  # its scale would be subnormal in float16
    x = _correlated_inputs(rng, 256, k)
    h = x.T.astype(np.float64) @ x
    nw = quantize_nbits(w, 4, 32, symmetric=symmetric, hessian=h, scale_dtype=np.float16)
    assert nw.scales.dtype == np.float16 and nw.scales.min() >= np.finfo(np.float16).tiny
    np.testing.assert_allclose(dequantize_nbits(nw), nw.dequantized, atol=1e-6)
    assert np.abs(nw.dequantized[:32, 3] - w[:32, 3]).max() < 1e-4
    wide = quantize_nbits(w, 4, 32, symmetric=symmetric, hessian=h)
    assert np.linalg.norm(x @ (nw.dequantized - w)) < 1.02 * np.linalg.norm(x @ (wide.dequantized - w))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    a = rng.standard_normal((5, k)).astype(np.float32)
    np.testing.assert_allclose(_matmul_nbits_session(nw, options).run(None, {"A": a})[0], a @ nw.dequantized,
                               rtol=1e-4, atol=1e-4)
    assert [nd.op_type for nd in onnx.load(tmp_path / "optimized.onnx").graph.node] == ["MatMulNBits"]


def test_float16_scales_fall_back_to_float32_where_they_would_overflow():
    w = np.full((32, 2), 1e6, np.float32)
    assert quantize_nbits(w, 4, 32, scale_dtype=np.float16).scales.dtype == np.float32
