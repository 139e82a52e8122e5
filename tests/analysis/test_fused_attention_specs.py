"""The fused attention op table: positions, attribute names, and the onnxpress op's slots
taken from its schema."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from onnxpress.analysis.attention.fused_ops import (
    GROUP_QUERY_ATTENTION,
    MULTI_HEAD_ATTENTION,
    ONNX_ATTENTION,
    ONNXPRESS_ATTENTION,
    SPECS,
    spec_for,
)
from onnxpress.runtime_ops import schema


@pytest.mark.parametrize("spec", SPECS, ids=[f"{s.domain or 'onnx'}.{s.op_type}" for s in SPECS])
def test_every_role_reads_back_from_its_position(spec):
    assert len(set(spec.inputs.values())) == len(spec.inputs)
    assert len(set(spec.outputs.values())) == len(spec.outputs)
    values = {role: ir.Value(name=role) for role in spec.inputs}
    node = ir.node(spec.op_type, spec.input_list(**values), domain=spec.domain, num_outputs=len(spec.outputs))
    assert spec_for(node) is spec
    for role, value in values.items():
        assert spec.input(node, role) is value
    assert spec.input(node, "no_such_role") is None
    with pytest.raises(KeyError):
        spec.input_list(no_such_role=None)


def test_omitted_trailing_inputs_are_left_off():
    q, k, v, bias = (ir.Value(name=n) for n in "qkvb")
    assert MULTI_HEAD_ATTENTION.input_list(query=q, key=k, value=v) == [q, k, v]
    with_bias = MULTI_HEAD_ATTENTION.input_list(query=q, key=k, value=v, attention_bias=bias)
    assert with_bias == [q, k, v, None, None, bias]


def test_attribute_names_per_op():
    common = {"num_heads": 4, "kv_num_heads": 2, "scale": 0.25, "causal": True, "window": 3}
    assert GROUP_QUERY_ATTENTION.attributes(**common) == {"num_heads": 4, "kv_num_heads": 2, "scale": 0.25}
    assert MULTI_HEAD_ATTENTION.attributes(**common) == {"num_heads": 4, "scale": 0.25, "unidirectional": 1}
    assert ONNX_ATTENTION.attributes(**common) == {"q_num_heads": 4, "kv_num_heads": 2, "scale": 0.25,
                                                   "is_causal": 1}
    assert ONNXPRESS_ATTENTION.attributes(**common) == {"num_heads": 4, "kv_num_heads": 2, "scale": 0.25,
                                                        "causal": 1, "window": 3}
    node = ir.node("Attention", [], ONNX_ATTENTION.attributes(**common), domain="ai.onnx")
    assert spec_for(node) is ONNX_ATTENTION
    assert ONNX_ATTENTION.read_heads(node) == (4, 2) and ONNX_ATTENTION.read_causal(node)
    assert ONNX_ATTENTION.read_scale(node) == pytest.approx(0.25)
    gqa = ir.node("GroupQueryAttention", [], {"num_heads": 4}, domain="com.microsoft")
    assert GROUP_QUERY_ATTENTION.read_heads(gqa) == (4, 0) and GROUP_QUERY_ATTENTION.read_causal(gqa)
    assert GROUP_QUERY_ATTENTION.read_scale(gqa) == 0.0  # absent: the op's 1/sqrt(head_size)


def test_onnxpress_slots_come_from_its_schema():
    spec = ONNXPRESS_ATTENTION
    assert (spec.domain, spec.op_type, spec.since_version) == (schema.DOMAIN, schema.ATTENTION_OP,
                                                              schema.DOMAIN_VERSION)
    proto = schema.make_attention_node("q", "k", "v", "out", num_heads=4, kv_num_heads=2, attention_mask="m",
                                       past_key="pk", past_value="pv", present_key="prk", present_value="prv")
    given = {"query": "q", "key": "k", "value": "v", "key_padding_mask": "m", "past_key": "pk",
             "past_value": "pv"}
    assert {role: proto.input[i] for role, i in spec.inputs.items()} == given
    outputs = {"output": "out", "present_key": "prk", "present_value": "prv"}
    assert {role: proto.output[i] for role, i in spec.outputs.items()} == outputs
