"""Fused attention nodes: ONNX Runtime's optimizer output and hand-built graphs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxpress.analysis import analyze, count_macs, count_params

from tiny_models import tiny_config_values, tiny_model

H, KV, D, HIDDEN, FFN, LAYERS = 4, 2, 16, 64, 128, 2


def _ort_optimized_bert(tmp_path, use_mha: bool, attn: str = "eager") -> ir.Model:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    opts = FusionOptions("bert")
    opts.use_multi_head_attention = use_mha
    opt = optimize_model(
        str(tiny_model("bert", "optimum", attn=attn)),
        model_type="bert",
        num_heads=H,
        hidden_size=HIDDEN,
        optimization_options=opts,
    )
    out = tmp_path / "bert_opt.onnx"
    opt.save_model_to_file(str(out))
    return ir.load(out)


@pytest.mark.parametrize(
    "use_mha,kind", [(False, "com.microsoft.Attention"), (True, "com.microsoft.MultiHeadAttention")]
)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_ort_optimizer_fused_bert(tmp_path, use_mha, kind, attn):
    model = _ort_optimized_bert(tmp_path, use_mha, attn)
    assert any(n.domain == "com.microsoft" and n.op_type == kind.split(".")[-1] for n in model.graph)
    tmap = analyze(model)
    cfg = tiny_config_values("bert")
    assert not tmap.unrecognised, tmap.unrecognised
    assert tmap.kind == "encoder" and not tmap.causal
    assert len(tmap.layers) == cfg["num_layers"]
    for layer in tmap.layers:
        att, ffn = layer.attention, layer.ffn
        assert att.kind == kind and att.fused_node is not None
        assert (att.num_heads, att.num_kv_heads, att.head_size) == (H, H, D)
        assert att.o is not None and att.o.d_in == H * D
        if use_mha:
            assert att.q is not None and att.k is not None and att.v is not None
        else:
            assert att.qkv is not None and att.qkv.d_out == 3 * H * D and att.qkv.node is att.fused_node
        assert att.mask is not None
        assert ffn is not None and ffn.ffn_size == cfg["ffn_size"] and ffn.activation == "gelu"
        assert [n.op_type for n in layer.norms] == ["SkipLayerNormalization"] * 2
    assert tmap.macs == count_macs(model, tmap=tmap)
    assert tmap.params == count_params(model)


# ---------------------------------------------------------- hand-built decoder


def _decoder_with_fused_attention(op: str) -> onnx.ModelProto:
    """A 2-layer pre-norm GQA decoder whose attention is one fused node:
    com.microsoft GroupQueryAttention or onnxpress.Attention."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def w(name, *shape):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name))
        return name

    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", HIDDEN])]
    outputs = []
    if op == "GroupQueryAttention":
        inputs += [
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
            helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        ]
    else:
        inputs += [helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"])]
    h = "x"
    for i in range(LAYERS):
        p = f"l{i}"
        for kv in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kv}", TensorProto.FLOAT, ["B", KV, "P", D]
                )
            )
            outputs.append(
                helper.make_tensor_value_info(f"present.{i}.{kv}", TensorProto.FLOAT, ["B", KV, "T", D])
            )
        nodes.append(
            helper.make_node(
                "SimplifiedLayerNormalization", [h, w(f"{p}.ln1", HIDDEN)], [f"{p}.n1"], epsilon=1e-6, axis=-1
            )
        )
        nodes.append(helper.make_node("MatMul", [f"{p}.n1", w(f"{p}.wq", HIDDEN, H * D)], [f"{p}.q"]))
        nodes.append(helper.make_node("MatMul", [f"{p}.n1", w(f"{p}.wk", HIDDEN, KV * D)], [f"{p}.k"]))
        nodes.append(helper.make_node("MatMul", [f"{p}.n1", w(f"{p}.wv", HIDDEN, KV * D)], [f"{p}.v"]))
        past = [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outs = [f"{p}.ctx", f"present.{i}.key", f"present.{i}.value"]
        if op == "GroupQueryAttention":
            nodes.append(
                helper.make_node(
                    "GroupQueryAttention",
                    [f"{p}.q", f"{p}.k", f"{p}.v", *past, "seqlens_k", "total_sequence_length"],
                    outs,
                    domain="com.microsoft",
                    num_heads=H,
                    kv_num_heads=KV,
                )
            )
        else:
            nodes.append(
                helper.make_node(
                    "Attention",
                    [f"{p}.q", f"{p}.k", f"{p}.v", "attention_mask", *past],
                    outs,
                    domain="onnxpress",
                    num_heads=H,
                    kv_num_heads=KV,
                    causal=1,
                )
            )
        nodes.append(helper.make_node("MatMul", [f"{p}.ctx", w(f"{p}.wo", H * D, HIDDEN)], [f"{p}.o"]))
        nodes.append(helper.make_node("Add", [h, f"{p}.o"], [f"{p}.h1"]))
        nodes.append(
            helper.make_node(
                "SimplifiedLayerNormalization",
                [f"{p}.h1", w(f"{p}.ln2", HIDDEN)],
                [f"{p}.n2"],
                epsilon=1e-6,
                axis=-1,
            )
        )
        nodes.append(helper.make_node("MatMul", [f"{p}.n2", w(f"{p}.wg", HIDDEN, FFN)], [f"{p}.g"]))
        nodes.append(helper.make_node("MatMul", [f"{p}.n2", w(f"{p}.wu", HIDDEN, FFN)], [f"{p}.u"]))
        nodes.append(helper.make_node("Sigmoid", [f"{p}.g"], [f"{p}.sg"]))
        nodes.append(helper.make_node("Mul", [f"{p}.g", f"{p}.sg"], [f"{p}.act"]))
        nodes.append(helper.make_node("Mul", [f"{p}.act", f"{p}.u"], [f"{p}.gu"]))
        nodes.append(helper.make_node("MatMul", [f"{p}.gu", w(f"{p}.wd", FFN, HIDDEN)], [f"{p}.d"]))
        nodes.append(helper.make_node("Add", [f"{p}.h1", f"{p}.d"], [f"{p}.h2"]))
        h = f"{p}.h2"
    nodes.append(
        helper.make_node("SimplifiedLayerNormalization", [h, w("lnf", HIDDEN)], ["nf"], epsilon=1e-6, axis=-1)
    )
    nodes.append(helper.make_node("MatMul", ["nf", w("lm_head", HIDDEN, 1000)], ["logits"]))
    outputs.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "S", 1000]))
    graph = helper.make_graph(nodes, "fused_decoder", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    if op != "GroupQueryAttention":
        opsets.append(helper.make_opsetid("onnxpress", 1))
    return helper.make_model(graph, opset_imports=opsets, ir_version=9)


@pytest.mark.parametrize(
    "op,kind",
    [("GroupQueryAttention", "com.microsoft.GroupQueryAttention"), ("onnxpress", "onnxpress.Attention")],
)
def test_hand_built_fused_decoder(op, kind):
    proto = _decoder_with_fused_attention(op)
    model = ir.serde.deserialize_model(proto)
    tmap = analyze(model)
    assert not tmap.unrecognised, tmap.unrecognised
    assert tmap.kind == "decoder" and tmap.causal
    assert len(tmap.layers) == LAYERS
    assert len(tmap.kv_cache_inputs) == len(tmap.kv_cache_outputs) == 2 * LAYERS
    for i, layer in enumerate(tmap.layers):
        att, ffn = layer.attention, layer.ffn
        assert att.kind == kind
        assert (att.num_heads, att.num_kv_heads, att.head_size) == (H, KV, D)
        assert att.q.d_out == H * D and att.k.d_out == KV * D and att.o.d_in == H * D
        assert att.past_key.name == f"past_key_values.{i}.key"
        assert att.present_value.name == f"present.{i}.value"
        assert ffn.gate is not None and ffn.activation == "silu" and ffn.ffn_size == FFN
        assert len(layer.norms) == 2 and len(layer.residual_adds) == 2
    assert [e.role for e in tmap.extras] == ["lm_head"]


def test_hand_built_gqa_runs_in_onnxruntime():
    """The GQA graph above is a valid ORT model (the analysis is not reading fiction)."""
    import onnxruntime as ort

    proto = _decoder_with_fused_attention("GroupQueryAttention")
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    b, s = 1, 3
    feeds = {
        "x": np.zeros((b, s, HIDDEN), np.float32),
        "seqlens_k": np.array([s - 1], np.int32),
        "total_sequence_length": np.array(s, np.int32),
    }
    for i in range(LAYERS):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((b, KV, 0, D), np.float32)
    out = sess.run(None, feeds)
    assert out[0].shape == (b, s, 1000)
