"""onnxpress.Attention (CPU) against a numpy reference and the decomposed ONNX graph run by ORT."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxpress.runtime_ops import make_attention_node, opset_import

from attention_reference import (
    IR_VERSION,
    allowed_keys,
    attention_op_model,
    decomposed_attention_model,
    padding_mask,
    random_inputs,
    reference_attention,
)

ATOL = 1e-4


def run_op(make_session, feeds, with_present=False, **attributes):
    session = make_session(attention_op_model(feeds, with_present=with_present, **attributes))
    return session.run(None, feeds)


def run_decomposed(feeds, **attributes):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    model = decomposed_attention_model(feeds, **attributes)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def reference(feeds, **attributes):
    return reference_attention(
        feeds["query"], feeds["key"], feeds["value"], mask=feeds.get("attention_mask"),
        past_key=feeds.get("past_key"), past_value=feeds.get("past_value"), **attributes,
    )


def rows_with_keys(feeds, causal=False, window=0, **_):
    """[B, S_q] bool: query rows that see at least one key (the decomposed graph has no answer
    for the others: its finite -1e9 bias turns them into a uniform average)."""
    q_len, total = feeds["query"].shape[1], feeds["attention_mask"].shape[1] if "attention_mask" in feeds else None
    total = total or feeds["key"].shape[1] + (feeds["past_key"].shape[2] if "past_key" in feeds else 0)
    visible = allowed_keys(q_len, total, causal, window)[None]
    if "attention_mask" in feeds:
        visible = visible & (feeds["attention_mask"] != 0)[:, None, :]
    return np.broadcast_to(visible.any(-1), feeds["query"].shape[:2])


def check_against_both(make_session, feeds, **attributes):
    (out,) = run_op(make_session, feeds, **attributes)
    expected, _, _ = reference(feeds, **attributes)
    np.testing.assert_allclose(out, expected, atol=ATOL, rtol=0)
    rows = rows_with_keys(feeds, **attributes)
    np.testing.assert_allclose(out[rows], run_decomposed(feeds, **attributes)[rows], atol=ATOL, rtol=0)
    return out


@pytest.mark.parametrize(("num_heads", "kv_num_heads", "head_size"), [(12, 12, 32), (9, 3, 64), (5, 1, 17)])
@pytest.mark.parametrize("seq", [1, 37, 200])  # 200 crosses query-block, 128-key tile and 16-key panel edges
def test_matches_references_mha_and_gqa(make_session, num_heads, kv_num_heads, head_size, seq):
    rng = np.random.default_rng(seq + num_heads)
    feeds = random_inputs(rng, 2, seq, seq, num_heads, kv_num_heads, head_size)
    check_against_both(make_session, feeds, num_heads=num_heads, kv_num_heads=kv_num_heads)


@pytest.mark.parametrize("mask_dtype", [np.int64, np.int32, np.float32, np.bool_])
def test_padding_mask_per_batch(make_session, mask_dtype):
    rng = np.random.default_rng(1)
    feeds = random_inputs(rng, 3, 70, 70, 4, 2, 32)
    feeds["attention_mask"] = padding_mask([70, 41, 5], 70, mask_dtype)
    check_against_both(make_session, feeds, num_heads=4, kv_num_heads=2)


@pytest.mark.parametrize(
    "attributes",
    [
        {"causal": True},
        {"causal": True, "window": 16},
        {"causal": False, "window": 16},
        {"causal": True, "window": 1},
        {"causal": True, "scale": 0.3},
    ],
    ids=["causal", "causal-window", "window", "causal-window1", "causal-scale"],
)
def test_causal_and_sliding_window(make_session, attributes):
    rng = np.random.default_rng(2)
    # 200 rows: two query blocks, two key tiles; a window leaves whole tiles unseen by some row groups
    feeds = random_inputs(rng, 2, 200, 200, 6, 2, 32)
    feeds["attention_mask"] = padding_mask([200, 170], 200)
    check_against_both(make_session, feeds, num_heads=6, kv_num_heads=2, **attributes)


@pytest.mark.parametrize("window", [0, 4])
def test_decode_step_with_past_equals_full_sequence(make_session, window):
    """A 7-token prompt then 1 decode step through past/present equals running all 8 tokens."""
    rng = np.random.default_rng(3)
    heads, kv_heads, d = 6, 2, 32
    full = random_inputs(rng, 2, 8, 8, heads, kv_heads, d)
    attrs = {"num_heads": heads, "kv_num_heads": kv_heads, "causal": True, "window": window}
    full_out, full_key, full_value = run_op(make_session, full, with_present=True, **attrs)

    prompt = {name: array[:, :7] for name, array in full.items()}
    prompt_out, past_key, past_value = run_op(make_session, prompt, with_present=True, **attrs)
    step = {name: array[:, 7:] for name, array in full.items()}
    step.update(past_key=past_key, past_value=past_value)
    step_out, present_key, present_value = run_op(make_session, step, with_present=True, **attrs)

    np.testing.assert_allclose(prompt_out, full_out[:, :7], atol=ATOL, rtol=0)
    np.testing.assert_allclose(step_out, full_out[:, 7:], atol=ATOL, rtol=0)
    np.testing.assert_array_equal(present_key, full_key)
    np.testing.assert_array_equal(present_value, full_value)
    assert present_key.shape == (2, kv_heads, 8, d)
    expected, _, _ = reference(step, num_heads=heads, kv_num_heads=kv_heads, causal=True, window=window)
    np.testing.assert_allclose(step_out, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("kv_num_heads", "window"), [(4, 0), (2, 0), (2, 4)])
def test_past_with_padding_mask_matches_references(make_session, kv_num_heads, window):
    """A chunk of 3 new tokens after a 9-token cache at batch 2, rows padded differently (the
    chunked / speculative decoding step that GroupQueryAttention refuses at batch > 1)."""
    rng = np.random.default_rng(4)
    feeds = random_inputs(rng, 2, 3, 3, 4, kv_num_heads, 16, past_len=9)
    feeds["attention_mask"] = padding_mask([12, 10], 12)
    feeds["attention_mask"][1, :2] = 0  # left padding too
    check_against_both(make_session, feeds, num_heads=4, kv_num_heads=kv_num_heads, causal=True, window=window)


def test_fully_masked_rows_are_zero(make_session):
    rng = np.random.default_rng(5)
    feeds = random_inputs(rng, 2, 20, 20, 4, 4, 16)
    feeds["attention_mask"] = padding_mask([20, 0], 20)  # batch 1 has no key at all
    (out,) = run_op(make_session, feeds, num_heads=4)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[1], 0.0)
    expected, _, _ = reference(feeds, num_heads=4)
    np.testing.assert_allclose(out, expected, atol=ATOL, rtol=0)


def test_causal_rows_without_visible_keys_are_zero(make_session):
    """Left padding + causal: the first query rows of batch 1 see only padded keys."""
    rng = np.random.default_rng(6)
    feeds = random_inputs(rng, 2, 10, 10, 2, 1, 8)
    mask = np.ones((2, 10), np.int64)
    mask[1, :4] = 0
    feeds["attention_mask"] = mask
    (out,) = run_op(make_session, feeds, num_heads=2, kv_num_heads=1, causal=True)
    np.testing.assert_array_equal(out[1, :4], 0.0)
    expected, _, _ = reference(feeds, num_heads=2, kv_num_heads=1, causal=True)
    np.testing.assert_allclose(out, expected, atol=ATOL, rtol=0)


def test_scalar_fallback_matches(make_session, monkeypatch):
    """ONNXPRESS_OPS_SIMD=scalar forces the portable kernels (what CPUs without AVX2 run)."""
    rng = np.random.default_rng(7)
    feeds = random_inputs(rng, 2, 70, 70, 6, 3, 17)
    feeds["attention_mask"] = padding_mask([70, 33], 70)
    attrs = {"num_heads": 6, "kv_num_heads": 3, "causal": True, "window": 20}
    (fast,) = run_op(make_session, feeds, **attrs)
    monkeypatch.setenv("ONNXPRESS_OPS_SIMD", "scalar")
    (scalar,) = run_op(make_session, feeds, **attrs)
    np.testing.assert_allclose(scalar, fast, atol=ATOL, rtol=0)
    np.testing.assert_allclose(scalar, reference(feeds, **attrs)[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("simd", ["auto", "scalar"])
def test_scores_far_above_the_running_max(make_session, monkeypatch, simd):
    """Unmasked tiles take exponentials against the running max of earlier keys; when later keys
    score far higher (here the scores climb by hundreds of log2 units along the keys), that
    reference is abandoned and the tile redone with an exact max. No overflow, no NaN."""
    if simd == "scalar":
        monkeypatch.setenv("ONNXPRESS_OPS_SIMD", "scalar")
    rng = np.random.default_rng(9)
    feeds = random_inputs(rng, 1, 300, 300, 2, 2, 16)
    ramp = np.linspace(0.0, 1.0, 300, dtype=np.float32)[None, :, None]
    feeds["query"] = np.abs(feeds["query"]) * 3.0
    feeds["key"] = (np.abs(feeds["key"]) * 40.0 * ramp).astype(np.float32)
    (out,) = run_op(make_session, feeds, num_heads=2)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, reference(feeds, num_heads=2)[0], atol=ATOL, rtol=0)


def test_cross_attention_lengths_differ(make_session):
    rng = np.random.default_rng(8)
    feeds = random_inputs(rng, 2, 5, 33, 4, 4, 16)
    check_against_both(make_session, feeds, num_heads=4)


def test_output_shape_is_inferred(make_session):
    rng = np.random.default_rng(9)
    feeds = random_inputs(rng, 1, 4, 4, 2, 2, 8)
    session = make_session(attention_op_model(feeds, num_heads=2))
    assert session.get_outputs()[0].shape == [1, 4, 16]


def _inferred_dims_match(declared, actual):
    """ORT's inferred shape agrees with a run: same rank, every integer dim is the real size
    (symbolic / unknown dims are free)."""
    return len(declared) == len(actual) and all(not isinstance(d, int) or d == a for d, a in zip(declared, actual, strict=True))


def test_unknown_dims_stay_symbolic_through_shape_sensitive_ops(make_session):
    """Unnamed unknown query dims must not come out of the op as a literal -1: ORT would then
    carry -1 through Reshape / MatMul / Add / Concat as if it were a size (onnx.shape_inference
    cannot see custom ops, so this checks ORT's own inference)."""
    heads, d = 2, 8
    hidden = heads * d

    def unknown(name):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [None, None, hidden])

    nodes = [
        make_attention_node("q", "k", "v", "att", num_heads=heads),
        helper.make_node("Reshape", ["att", "split"], ["att4"]),
        helper.make_node("Transpose", ["att4"], ["heads"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["att", "w"], ["proj"]),
        helper.make_node("Add", ["proj", "q"], ["residual"]),
        helper.make_node("Concat", ["residual", "q"], ["joined"], axis=1),
        helper.make_node("Shape", ["joined"], ["joined_shape"]),
    ]
    inits = [numpy_helper.from_array(np.array([0, 0, heads, d], np.int64), "split"),
             numpy_helper.from_array(np.eye(hidden, dtype=np.float32), "w")]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("att", "heads", "joined")]
    outputs.append(helper.make_tensor_value_info("joined_shape", TensorProto.INT64, None))
    graph = helper.make_graph(nodes, "shapes", [unknown(n) for n in "qkv"], outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), opset_import()],
                              ir_version=IR_VERSION)
    session = make_session(model)
    declared = {o.name: o.shape for o in session.get_outputs()}
    assert declared["att"][2] == hidden and declared["heads"][1::2] == [heads, d]
    for name in ("att", "heads", "joined"):
        assert all(not isinstance(dim, int) or dim >= 0 for dim in declared[name]), (name, declared[name])

    rng = np.random.default_rng(10)
    feeds = {n: rng.standard_normal((3, 5, hidden)).astype(np.float32) for n in "qkv"}
    results = dict(zip(declared, session.run(None, feeds), strict=True))
    assert results["joined"].shape == (3, 10, hidden)
    assert results["joined_shape"].tolist() == [3, 10, hidden]
    for name in ("att", "heads", "joined"):
        assert _inferred_dims_match(declared[name], results[name].shape), (name, declared[name])
