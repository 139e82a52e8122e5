"""The packaged real models map completely (first run exports them; cached after)."""

from __future__ import annotations

import pytest

from onnxpress.analysis import analyze, count_macs, count_params
from onnxpress.model_io import load_model

pytestmark = pytest.mark.real_model


def test_minilm(minilm_onnx):
    model = load_model(minilm_onnx)
    tmap = analyze(model)
    assert not tmap.unrecognised, tmap.unrecognised
    assert tmap.kind == "encoder" and not tmap.causal
    assert len(tmap.layers) == 6
    for layer in tmap.layers:
        att, ffn = layer.attention, layer.ffn
        assert (att.num_heads, att.num_kv_heads, att.head_size) == (12, 12, 32)
        assert ffn.ffn_size == 1536 and ffn.activation == "gelu" and ffn.gate is None
        assert att.mask is not None and not att.rotary
        assert len(layer.norms) == 2 and len(layer.residual_adds) == 2
    # 22.7M parameters in the HF checkpoint (incl. the unused pooler, absent from the export)
    assert 22_000_000 < tmap.params < 23_000_000
    assert tmap.params == count_params(model)
    assert tmap.macs == count_macs(model, tmap=tmap)


def test_smollm2(smollm2_onnx):
    model = load_model(smollm2_onnx)
    tmap = analyze(model)
    assert not tmap.unrecognised, tmap.unrecognised
    assert tmap.kind == "decoder" and tmap.causal
    assert len(tmap.layers) == 30
    assert len(tmap.kv_cache_inputs) == len(tmap.kv_cache_outputs) == 60
    for layer in tmap.layers:
        att, ffn = layer.attention, layer.ffn
        assert (att.num_heads, att.num_kv_heads, att.head_size) == (9, 3, 64)
        assert att.q.d_out == 576 and att.k.d_out == 192 and att.o.d_in == 576
        assert att.rotary and att.causal
        assert ffn.ffn_size == 1536 and ffn.activation == "silu" and ffn.gate is not None
        assert len(layer.norms) == 2 and len(layer.residual_adds) == 2
    lm_head = [e for e in tmap.extras if e.role == "lm_head"]
    assert len(lm_head) == 1 and (lm_head[0].linear.d_in, lm_head[0].linear.d_out) == (576, 49152)
    # 134.5M as in the HF checkpoint: optimum spells the tied LM head as Transpose(embed_tokens),
    # so the shared weight counts once
    assert 130_000_000 < tmap.params < 140_000_000
