"""References for onnxpress.Attention: plain numpy, and the same maths as a decomposed ONNX graph."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxpress.runtime_ops import make_attention_node, opset_import

IR_VERSION = 10  # onnxruntime 1.31 rejects the IR version onnx 1.23 writes by default


def allowed_keys(q_len, total_len, causal=False, window=0):
    """[S_q, S_total] bool: which keys each query may attend (queries aligned to the end)."""
    pos = np.arange(q_len)[:, None] + (total_len - q_len)
    key = np.arange(total_len)[None, :]
    allowed = np.ones((q_len, total_len), dtype=bool)
    if causal:
        allowed &= key <= pos
    if window:
        allowed &= key > pos - window
        if not causal:
            allowed &= key < pos + window
    return allowed


def reference_attention(q, k, v, num_heads, kv_num_heads=None, scale=None, causal=False, window=0, mask=None,
                        past_key=None, past_value=None):
    """Returns (output, present_key, present_value) computed in float64."""
    batch, q_len, hidden = q.shape
    heads, kv_heads = num_heads, kv_num_heads or num_heads
    d = hidden // heads
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    kh = k.astype(np.float64).reshape(batch, -1, kv_heads, d).transpose(0, 2, 1, 3)
    vh = v.astype(np.float64).reshape(batch, -1, kv_heads, d).transpose(0, 2, 1, 3)
    if past_key is not None:
        kh = np.concatenate([past_key.astype(np.float64), kh], axis=2)
        vh = np.concatenate([past_value.astype(np.float64), vh], axis=2)
    total = kh.shape[2]
    group = heads // kv_heads
    k_rep, v_rep = np.repeat(kh, group, axis=1), np.repeat(vh, group, axis=1)  # head h -> kv head h // group
    qh = q.astype(np.float64).reshape(batch, q_len, heads, d).transpose(0, 2, 1, 3)
    scores = qh @ k_rep.transpose(0, 1, 3, 2) * scale
    allowed = np.broadcast_to(allowed_keys(q_len, total, causal, window), scores.shape)
    if mask is not None:
        allowed = allowed & (np.asarray(mask) != 0)[:, None, None, :]
    scores = np.where(allowed, scores, -np.inf)
    row_max = scores.max(-1, keepdims=True)
    probs = np.where(allowed, np.exp(scores - np.where(np.isfinite(row_max), row_max, 0.0)), 0.0)
    denom = probs.sum(-1, keepdims=True)
    out = np.where(denom > 0, (probs @ v_rep) / np.where(denom > 0, denom, 1.0), 0.0)
    out = out.transpose(0, 2, 1, 3).reshape(batch, q_len, heads * d)
    return out.astype(np.float32), kh.astype(np.float32), vh.astype(np.float32)


def _value_info(name, array):
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), list(array.shape))


def attention_op_model(feeds, *, with_present=False, **attributes):
    """A one-node model running onnxpress.Attention on *feeds* (names from ATTENTION_INPUTS)."""
    outputs = ["output"] + (["present_key", "present_value"] if with_present else [])
    node = make_attention_node(
        "query", "key", "value", "output",
        attention_mask="attention_mask" if "attention_mask" in feeds else None,
        past_key="past_key" if "past_key" in feeds else None,
        past_value="past_value" if "past_value" in feeds else None,
        present_key="present_key" if with_present else None,
        present_value="present_value" if with_present else None,
        **attributes,
    )
    graph = helper.make_graph(
        [node], "onnxpress_attention",
        [_value_info(name, array) for name, array in feeds.items()],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), opset_import()], ir_version=IR_VERSION)


def decomposed_attention_model(feeds, num_heads, kv_num_heads=None, scale=None, causal=False, window=0):
    """The same attention as standard ONNX ops (Reshape/Transpose/MatMul/Mul/Add/Softmax), the
    way exported models spell it; masks become a -1e9 additive bias, so rows must not be fully masked."""
    q, k = feeds["query"], feeds["key"]
    batch, q_len, hidden = q.shape
    heads, kv_heads = num_heads, kv_num_heads or num_heads
    d = hidden // heads
    group = heads // kv_heads
    past = feeds.get("past_key")
    total = k.shape[1] + (past.shape[2] if past is not None else 0)
    scale = 1.0 / np.sqrt(d) if scale is None else scale

    inits = {
        "q_shape": np.array([batch, q_len, heads, d], np.int64),
        "kv_shape": np.array([batch, k.shape[1], kv_heads, d], np.int64),
        "expand_shape": np.array([batch, kv_heads, group, total, d], np.int64),
        "rep_shape": np.array([batch, heads, total, d], np.int64),
        "out_shape": np.array([batch, q_len, hidden], np.int64),
        "scale": np.array(scale, np.float32),
        "axes_1": np.array([1], np.int64),
        "axes_2": np.array([2], np.int64),
        "one": np.array(1.0, np.float32),
        "neg_big": np.array(-1e9, np.float32),
        "position_bias": np.where(allowed_keys(q_len, total, causal, window), 0.0, -1e9).astype(np.float32),
    }
    nodes = [
        helper.make_node("Reshape", ["query", "q_shape"], ["q4"]),
        helper.make_node("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
    ]
    for name in ("key", "value"):
        nodes += [
            helper.make_node("Reshape", [name, "kv_shape"], [f"{name}4"]),
            helper.make_node("Transpose", [f"{name}4"], [f"{name}_new"], perm=[0, 2, 1, 3]),
        ]
        source = f"{name}_new"
        if past is not None:
            nodes.append(helper.make_node("Concat", [f"past_{name}", source], [f"{name}_all"], axis=2))
            source = f"{name}_all"
        nodes += [  # grouped-query attention: repeat each kv head for its group of query heads
            helper.make_node("Unsqueeze", [source, "axes_2"], [f"{name}_5d"]),
            helper.make_node("Expand", [f"{name}_5d", "expand_shape"], [f"{name}_exp"]),
            helper.make_node("Reshape", [f"{name}_exp", "rep_shape"], [f"{name}_h"]),
        ]
    nodes += [
        helper.make_node("Transpose", ["key_h"], ["key_t"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["qh", "key_t"], ["scores_raw"]),
        helper.make_node("Mul", ["scores_raw", "scale"], ["scores_scaled"]),
        helper.make_node("Add", ["scores_scaled", "position_bias"], ["scores_pos"]),
    ]
    scores = "scores_pos"
    if "attention_mask" in feeds:
        nodes += [
            helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
            helper.make_node("Sub", ["one", "mask_f"], ["mask_inv"]),
            helper.make_node("Mul", ["mask_inv", "neg_big"], ["mask_bias2"]),
            helper.make_node("Unsqueeze", ["mask_bias2", "axes_1"], ["mask_bias3"]),
            helper.make_node("Unsqueeze", ["mask_bias3", "axes_1"], ["mask_bias"]),
            helper.make_node("Add", [scores, "mask_bias"], ["scores_masked"]),
        ]
        scores = "scores_masked"
    nodes += [
        helper.make_node("Softmax", [scores], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "value_h"], ["context"]),
        helper.make_node("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["context_t", "out_shape"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, "decomposed_attention",
        [_value_info(name, array) for name, array in feeds.items()],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(value, name) for name, value in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)


def random_inputs(rng, batch, q_len, kv_len, num_heads, kv_num_heads, head_size, past_len=0):
    feeds = {
        "query": rng.standard_normal((batch, q_len, num_heads * head_size)).astype(np.float32),
        "key": rng.standard_normal((batch, kv_len, kv_num_heads * head_size)).astype(np.float32),
        "value": rng.standard_normal((batch, kv_len, kv_num_heads * head_size)).astype(np.float32),
    }
    if past_len:
        shape = (batch, kv_num_heads, past_len, head_size)
        feeds["past_key"] = rng.standard_normal(shape).astype(np.float32)
        feeds["past_value"] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def padding_mask(lengths, total, dtype=np.int64):
    """HF-style key padding mask: 1 for the first ``length`` keys of each row, 0 after."""
    mask = (np.arange(total)[None, :] < np.asarray(lengths)[:, None])
    return mask.astype(dtype)


def model_bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()
