"""The analysis maps every tiny architecture x exporter exactly as its HF config says.

Exports are cached (see tests/tiny_models.py); a cold run exports everything once.
"""

from __future__ import annotations

import math

import pytest

from onnxpress.analysis import TransformerMap, analyze, count_macs, count_params
from onnxpress.model_io import load_model

from tiny_models import (
    ALL_ARCHS,
    DECODER_ARCHS,
    EXPORTERS,
    hf_layer_params,
    tiny_config_values,
    tiny_model,
)

# Architectures that torch.onnx cannot export in this torch/transformers version:
# {(arch, exporter): reason}. Marked xfail(strict) so a fix shows up as XPASS.
# (Empty with torch 2.13 / transformers 4.57: every arch exports with every exporter.)
KNOWN_EXPORT_FAILURES: dict[tuple[str, str], str] = {}


def _params(cases):
    out = []
    for arch, exporter in cases:
        marks = []
        if (arch, exporter) in KNOWN_EXPORT_FAILURES:
            marks.append(pytest.mark.xfail(reason=KNOWN_EXPORT_FAILURES[arch, exporter], strict=True))
        out.append(pytest.param(arch, exporter, marks=marks, id=f"{arch}-{exporter}"))
    return out


def map_of(path) -> tuple[TransformerMap, object]:
    model = load_model(path)
    return analyze(model), model


# what the configs say beyond the shared sizes
SEPARATE_GATE = ("llama", "qwen2", "mistral", "qwen3", "gemma", "granite")
PACKED_GATE_UP = ("phi3", "modernbert")  # one MatMul for gate and up
ACTIVATIONS = {"gpt2": "gelu_new", "phi": "gelu_new", "gemma": "gelu_new",  # tanh-approximated GELU
               **dict.fromkeys(("llama", "qwen2", "mistral", "qwen3", "phi3", "granite"), "silu")}
SCALES = {"granite": 1.0}  # attention_multiplier, not 1/sqrt(head size)


def check_map(tmap: TransformerMap, arch: str) -> None:
    """Everything the config determines, for every layer."""
    cfg = tiny_config_values(arch)
    assert not tmap.unrecognised, tmap.unrecognised
    assert tmap.kind == cfg["kind"]
    assert tmap.causal == cfg["causal"]
    assert len(tmap.layers) == cfg["num_layers"], tmap.format_table()
    for i, layer in enumerate(tmap.layers):
        att, ffn = layer.attention, layer.ffn
        assert layer.index == i and att is not None and ffn is not None, tmap.format_table()
        assert att.layer == i and ffn.layer == i
        assert (att.num_heads, att.num_kv_heads, att.head_size) == (
            cfg["num_heads"],
            cfg["num_kv_heads"],
            cfg["head_size"],
        ), tmap.format_table()
        assert ffn.ffn_size == cfg["ffn_size"]
        assert ffn.packed_gate_up == (arch in PACKED_GATE_UP)
        assert ffn.up.d_out == cfg["ffn_size"] * (2 if ffn.packed_gate_up else 1)
        assert ffn.down.d_out == cfg["hidden_size"]
        assert att.causal == cfg["causal"]
        assert att.rotary == cfg["rotary"]
        assert math.isclose(att.scale, SCALES.get(arch, 1 / math.sqrt(cfg["head_size"])), rel_tol=1e-4)
        assert att.o is not None and att.o.d_in == cfg["num_heads"] * cfg["head_size"]
        assert att.o.d_out == cfg["hidden_size"]
        if att.qkv is not None:
            assert att.qkv.d_out == (cfg["num_heads"] + 2 * cfg["num_kv_heads"]) * cfg["head_size"]
            assert att.qkv_layout in ("blocks", "interleaved")
        else:
            assert att.q.d_out == cfg["num_heads"] * cfg["head_size"]
            assert att.k.d_out == att.v.d_out == cfg["num_kv_heads"] * cfg["head_size"]
        if att.kind == "decomposed":
            assert (
                att.softmax is not None and att.scores_matmul is not None and att.context_matmul is not None
            )
            assert (
                att.softmax in att.nodes
                and att.scores_matmul in att.nodes
                and att.context_matmul in att.nodes
            )
        assert (ffn.gate is not None) == (arch in SEPARATE_GATE)
        assert ffn.activation == ACTIVATIONS.get(arch, "gelu")
        assert layer.norms, f"layer {i}: no norms"
        assert len(layer.norms) == (1 if arch == "phi" else 4 if arch == "qwen3" else 2)  # Qwen3: + q/k norms
        assert len(layer.residual_adds) == 2
    if cfg["kind"] == "decoder":
        assert [e.role for e in tmap.extras].count("lm_head") == 1
    # per-layer costs
    hf_params = hf_layer_params(arch)
    if arch == "modernbert":  # its layer 0 has no attention norm: the embedding norm it reads counts there
        hf_params += cfg["hidden_size"]
    for layer in tmap.layers:
        assert layer.params == hf_params, (layer.index, layer.params, hf_params)
        att = layer.attention
        assert layer.macs == sum(lin.d_in * lin.d_out for lin in layer.linears) + 2 * tmap.seq_len * (
            att.num_heads * att.head_size
        )


@pytest.mark.parametrize("arch,exporter", _params([(a, e) for e in EXPORTERS for a in ALL_ARCHS]))
def test_tiny_export(arch, exporter):
    tmap, model = map_of(tiny_model(arch, exporter))
    check_map(tmap, arch)
    assert not tmap.kv_cache_inputs and not tmap.kv_cache_outputs
    assert tmap.params == count_params(model)
    assert tmap.macs == count_macs(model, tmap=tmap)
    d = tmap.to_dict()
    assert d["kind"] == tmap.kind and len(d["layers"]) == len(tmap.layers)
    assert d["layers"][0]["ffn_size"] == tiny_config_values(arch)["ffn_size"]
    table = tmap.format_table()
    assert f"{len(tmap.layers)} layers" in table


@pytest.mark.parametrize("arch,exporter", _params([(a, e) for e in EXPORTERS for a in DECODER_ARCHS]))
def test_tiny_decoder_with_past(arch, exporter):
    tmap, model = map_of(tiny_model(arch, exporter, with_past=True))
    check_map(tmap, arch)
    n = tiny_config_values(arch)["num_layers"]
    assert len(tmap.kv_cache_inputs) == len(tmap.kv_cache_outputs) == 2 * n
    graph_inputs = {v.name for v in model.graph.inputs}
    graph_outputs = {v.name for v in model.graph.outputs}
    for layer in tmap.layers:
        att = layer.attention
        assert att.past_key is not None and att.past_value is not None
        assert att.present_key is not None and att.present_value is not None
        assert att.past_key.name in graph_inputs and att.present_key.name in graph_outputs
        assert att.past_key is not att.past_value and att.present_key is not att.present_value
        # layer i reads past i (every exporter here numbers cache inputs by layer)
        assert f"{layer.index}" in att.past_key.name and "key" in att.past_key.name
        assert "value" in att.past_value.name and "value" in att.present_value.name


# both attention styles (eager / SDPA) for every family; SDPA is covered above
EAGER_CASES = [
    ("bert", "optimum"),
    ("bert", "dynamo"),
    ("distilbert", "optimum"),
    ("distilbert", "torchscript"),
    ("gpt2", "optimum"),
    ("gpt2", "dynamo"),
    ("llama", "optimum"),
    ("llama", "dynamo"),
    ("phi", "optimum"),
    ("gpt-neox", "optimum"),
    ("vit", "optimum"),
    ("vit", "torchscript"),
]


@pytest.mark.parametrize("arch,exporter", _params(EAGER_CASES))
def test_tiny_eager_attention(arch, exporter):
    tmap, _ = map_of(tiny_model(arch, exporter, attn="eager"))
    check_map(tmap, arch)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_dynamo_opset23_attention_op(arch):
    """torch.onnx dynamo at opset 23 emits the ONNX Attention (and RotaryEmbedding /
    RMSNormalization) ops."""
    tmap, _ = map_of(tiny_model(arch, "dynamo", opset=23))
    check_map(tmap, arch)
    assert {layer.attention.kind for layer in tmap.layers} == {"Attention"}
    for layer in tmap.layers:
        assert layer.attention.fused_node is not None and layer.attention.fused_node.op_type == "Attention"


def test_analysis_does_not_mutate():
    from onnxpress.model_io import model_proto

    model = load_model(tiny_model("llama", "optimum", with_past=True))
    before = model_proto(model).SerializeToString()
    analyze(model)
    assert model_proto(model).SerializeToString() == before


def test_head_shape_nodes_found_for_constant_head_counts():
    """Exports that spell head counts as constants expose them for pruning: optimum's BERT
    splits heads with Concat(b, -1, 4, 16) (3 splits) and merges with Concat(b, s, 64)."""
    tmap, _ = map_of(tiny_model("bert", "optimum"))
    for layer in tmap.layers:
        att = layer.attention
        reshapes = [n for n in att.head_shape_nodes if n.op_type == "Reshape"]
        assert len(reshapes) == 4, [n.name for n in att.head_shape_nodes]
        assert all(n in att.nodes for n in reshapes)
        assert any(n.op_type in ("Concat", "Constant") for n in att.head_shape_nodes)
        assert att.head_shape_values


def test_tiny_models_keep_config_and_tokenizer():
    """Like an ``onnxpress export`` folder: config.json and a tokenizer beside model.onnx."""
    from transformers import AutoTokenizer

    from tiny_models import VOCAB

    folder = tiny_model("llama", "optimum").parent
    assert (folder / "config.json").exists() and (folder / "tokenizer.json").exists()
    ids = AutoTokenizer.from_pretrained(folder)("calibration text, any words at all")["input_ids"]
    assert len(set(ids)) > 5 and max(ids) < VOCAB
