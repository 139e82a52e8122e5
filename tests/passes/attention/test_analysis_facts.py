"""The attention pass builds from the facts the analysis records, and the analysis reads back
what the pass wrote.

* For each decomposed core, the fused node gets the analysis' ``path_scale``, reads the
  ``q_path`` / ``k_path`` / ``v_path`` values (repacked by Transpose/Reshape only), takes
  the recorded KV cache, and its mask input is built from the recorded ``mask_terms``.
* Every fused op the pass writes is read back by the analysis, through the same fused-op
  table, with the heads, scale and causality the pass wrote.

Numerics of the same substitutions against ONNX Runtime are in test_attention.py.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
from test_attention import _feeds, _load, _max_diff, _need_library

from onnxpress.analysis import analyze, spec_for
from onnxpress.analysis.attention.fused_ops import (
    GROUP_QUERY_ATTENTION,
    MULTI_HEAD_ATTENTION,
    ONNX_ATTENTION,
    ONNXPRESS_ATTENTION,
)
from onnxpress.analysis.attention.scores import combined_scale
from onnxpress.model_io import load_model
from onnxpress.passes.attention import substitute_attention

TARGETS = ["onnxruntime", "onnx", "onnxpress"]
# (arch, with KV cache): plain MHA, packed QKV (GPT-2), rotary + GQA + cache, a bias table (MPNet),
# SDPA's shape-derived scale (RoBERTa), parallel residual (Phi)
CASES = [("bert", False), ("gpt2", False), ("qwen2", True), ("mpnet", False), ("roberta", False),
         ("phi", True)]
PREFIX = "/attention_fused/layer"


def _fused_node(model, layer: int):
    return next(n for n in model.graph if spec_for(n) is not None and n.name.startswith(f"{PREFIX}{layer}/"))


def _unpacked(value):
    """``value`` before the Transpose/Reshape the pass adds to pack Q/K/V."""
    node = value.producer()
    while node is not None and node.name.startswith(PREFIX) and node.op_type in ("Reshape", "Transpose"):
        value = node.inputs[0]
        node = value.producer()
    return value


def _upstream_names(value, limit=200) -> set[str]:
    names, queue, seen = set(), deque([value]), set()
    while queue and len(seen) < limit:
        v = queue.popleft()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        names.add(v.name)
        if v.producer() is not None:
            queue.extend(v.producer().inputs)
    return names


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("arch, past", CASES)
def test_fused_node_gets_the_recorded_facts(arch, past, target):
    _need_library(target)
    _, model = _load(arch, past=past)
    atts = analyze(model).attentions()
    recorded = [
        {
            "scale": att.path_scale,
            "walked": combined_scale([f for f in att.scale_factors if f.walked], att.head_size),
            "operands": [p.value.name for p in (att.q_path, att.k_path, att.v_path)],
            "terms": [t.value.name for t in att.mask_terms],
            "padding": {t.padding_source.name for t in att.mask_terms if t.padding_source is not None},
            "pure": all(t.pure for t in att.mask_terms),
            "past": [p.name if p is not None else None for p in (att.k_path.past, att.v_path.past)],
            "present": [p.present.name if p.present is not None else None for p in (att.k_path, att.v_path)],
        }
        for att in atts
    ]
    outcome = substitute_attention(model, target)
    for layer, (facts, info) in enumerate(zip(recorded, outcome.details["layers"], strict=True)):
        assert facts["scale"] == pytest.approx(facts["walked"])
        if "skipped" in info:  # onnxpress.Attention has no bias input for MPNet's position bias
            assert target == "onnxpress" and not facts["pure"], info
            continue
        node = _fused_node(model, layer)
        spec = spec_for(node)
        assert spec.kind == info["op"]
        assert spec.read_scale(node) == pytest.approx(facts["scale"], rel=1e-6)
        reads = [_unpacked(spec.input(node, role)).name for role in ("query", "key", "value")]
        assert reads == facts["operands"]
        cache = [spec.input(node, role) for role in ("past_key", "past_value")]
        assert [v.name if v is not None else None for v in cache] == facts["past"]
        if past:
            outputs = [spec.output(node, role).name for role in ("present_key", "present_value")]
            assert outputs == facts["present"]
        mask = spec.mask(node)
        if target == "onnxpress":  # the padding input the terms are built from, as the key-padding mask
            assert {mask.name} == facts["padding"] if mask is not None else not facts["padding"]
        elif spec is GROUP_QUERY_ATTENTION and facts["pure"] and facts["padding"]:
            # causality is the op's own: its bias comes from the padding input alone, and the
            # exported mask arithmetic is gone from the graph
            assert facts["padding"] <= _upstream_names(mask)
            assert not set(facts["terms"]) & {v.name for n in model.graph for v in n.outputs}
        elif mask is not None:  # the bias sums the recorded terms
            assert set(facts["terms"]) <= _upstream_names(mask)


# (arch, with KV cache, target, chunked_decoding, the fused op the pass writes)
WRITTEN = [
    ("bert", False, "onnxruntime", False, MULTI_HEAD_ATTENTION),
    ("llama", False, "onnxruntime", False, GROUP_QUERY_ATTENTION),
    ("llama", True, "onnxruntime", True, MULTI_HEAD_ATTENTION),  # causal, mask as bias, KV cache
    ("bert", False, "onnx", False, ONNX_ATTENTION),
    ("qwen2", True, "onnx", False, ONNX_ATTENTION),
    ("bert", False, "onnxpress", False, ONNXPRESS_ATTENTION),
    ("qwen2", True, "onnxpress", False, ONNXPRESS_ATTENTION),
]


def test_every_written_op_is_covered():
    assert {w[-1].kind for w in WRITTEN} == {s.kind for s in (MULTI_HEAD_ATTENTION, GROUP_QUERY_ATTENTION,
                                                              ONNX_ATTENTION, ONNXPRESS_ATTENTION)}


@pytest.mark.parametrize("arch, past, target, chunked, spec", WRITTEN,
                         ids=[f"{w[0]}-{w[2]}-{w[4].op_type}{'-past' if w[1] else ''}" for w in WRITTEN])
def test_analysis_reads_back_what_the_pass_wrote(arch, past, target, chunked, spec):
    _need_library(target)
    path, model = _load(arch, past=past)
    before = analyze(load_model(path))
    outcome = substitute_attention(model, target, chunked_decoding=chunked)
    after = analyze(model)
    assert not after.unrecognised, after.unrecognised
    assert (after.kind, after.causal, after.num_layers) == (before.kind, before.causal, before.num_layers)
    layers = zip(before.attentions(), after.attentions(), outcome.details["layers"], strict=True)
    for old, new, info in layers:
        assert new.kind == info["op"] == spec.kind
        assert spec_for(new.fused_node) is spec
        assert (new.num_heads, new.num_kv_heads) == (old.num_heads, old.num_kv_heads)
        assert new.head_size == old.head_size
        assert new.scale_source == "attribute" and new.scale == pytest.approx(info["scale"], rel=1e-6)
        assert new.scale == pytest.approx(old.scale, rel=1e-6)
        assert new.causal == old.causal
        assert [p.node.name for p in new.projections] == [p.node.name for p in old.projections]
        names = [v.name if v is not None else None for v in (new.past_key, new.past_value, new.present_key,
                                                             new.present_value)]
        assert names == [v.name if v is not None else None for v in (old.past_key, old.past_value,
                                                                     old.present_key, old.present_value)]
    batch, seq, cached = (1, 3, 4) if past else (2, 5, 0)
    assert _max_diff(path, model, [_feeds(model, batch=batch, seq=seq, past=cached)]) < 1e-4


def test_scores_filled_by_a_where_then_masked_by_an_add():
    """GPT-2's eager attention (dynamo export) fills the scores with a causal Where and adds the
    padding mask after it: the scores chain is read through both, as two mask terms."""
    path, model = _load("gpt2", exporter="dynamo", attn="eager")
    terms = analyze(model).attentions()[0].mask_terms
    assert [(t.node.op_type, t.condition) for t in terms] == [("Add", False), ("Where", True)]
    assert np.isfinite(terms[1].fill) and terms[1].fill < -1e30
    outcome = substitute_attention(model, "onnxruntime")
    assert outcome.changes["attention_fused"] == analyze(load_model(path)).num_layers, outcome.details
    assert _max_diff(path, model, [_feeds(model)]) < 1e-4
