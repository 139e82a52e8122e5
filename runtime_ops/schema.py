"""The ``onnxpress.Attention`` node: constants and a builder (schema in runtime_ops/README.md).

``ATTENTION_INPUTS`` / ``ATTENTION_OUTPUTS`` are the op's slots in order: the fused-op table
(``onnxpress.analysis.attention.fused_ops``) takes the input positions from them."""

import onnx
from onnx import helper

from onnxpress.errors import OnnxpressError

DOMAIN = "onnxpress"
DOMAIN_VERSION = 1
ATTENTION_OP = "Attention"
ATTENTION_INPUTS = ("query", "key", "value", "attention_mask", "past_key", "past_value")
ATTENTION_OUTPUTS = ("output", "present_key", "present_value")


def opset_import() -> onnx.OperatorSetIdProto:
    """The opset import a model using onnxpress ops needs (``onnxpress`` version 1)."""
    return helper.make_opsetid(DOMAIN, DOMAIN_VERSION)


def make_attention_node(
    query: str,
    key: str,
    value: str,
    output: str,
    *,
    num_heads: int,
    kv_num_heads: int | None = None,
    scale: float | None = None,
    causal: bool = False,
    window: int = 0,
    attention_mask: str | None = None,
    past_key: str | None = None,
    past_value: str | None = None,
    present_key: str | None = None,
    present_value: str | None = None,
    name: str | None = None,
) -> onnx.NodeProto:
    """An ``onnxpress.Attention`` NodeProto. Optional inputs/outputs left as None are omitted
    (written as "" when a later one is given). Attributes equal to their default are not written."""
    kv_heads = num_heads if kv_num_heads is None else kv_num_heads
    if num_heads <= 0 or kv_heads <= 0 or num_heads % kv_heads:
        raise OnnxpressError(
            f"onnxpress.Attention: kv_num_heads={kv_heads} must be > 0 and divide num_heads={num_heads}"
        )
    if (past_key is None) != (past_value is None):
        raise OnnxpressError("onnxpress.Attention: give past_key and past_value together")
    if window < 0:
        raise OnnxpressError(f"onnxpress.Attention: window={window} must be >= 0 (0 = no window)")
    attributes: dict = {"num_heads": int(num_heads)}
    if kv_heads != num_heads:
        attributes["kv_num_heads"] = int(kv_heads)
    if scale is not None:
        attributes["scale"] = float(scale)
    if causal:
        attributes["causal"] = 1
    if window:
        attributes["window"] = int(window)
    inputs = {"query": query, "key": key, "value": value, "attention_mask": attention_mask,
              "past_key": past_key, "past_value": past_value}
    outputs = {"output": output, "present_key": present_key, "present_value": present_value}
    return helper.make_node(
        ATTENTION_OP,
        _trim([inputs[name] for name in ATTENTION_INPUTS]),
        _trim([outputs[name] for name in ATTENTION_OUTPUTS]),
        name=name,
        domain=DOMAIN,
        **attributes,
    )


def _trim(names: list[str | None]) -> list[str]:
    names = ["" if n is None else n for n in names]
    while names and not names[-1]:
        names.pop()
    return names
