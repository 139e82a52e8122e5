"""Shapes and types of every value, ORT's contrib ops included, for the fusion rules' checks.

ONNX shape inference has no schema for ORT's contrib ops (GroupQueryAttention, MatMulNBits,
SimplifiedLayerNormalization...), so everything after the first of them would stay shapeless
and onnxscript's rules, which check ranks and dims, would match only the first layer. This
walks the graph in order: ONNX's per-node inference for standard ops, the kernels' own shape
rules for the contrib ops. Shapes are recomputed from the graph inputs (stale or partial
annotations are dropped first); graph outputs keep theirs.
"""

from __future__ import annotations

import logging

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxpress.analysis.graph_utils import constant_tensor

logger = logging.getLogger(__name__)

_SMALL = 64  # constant inputs up to this many elements are passed to inference as data (Reshape targets)


def _same_as_input(node: ir.Node) -> list[ir.Value | None]:
    return [node.inputs[0]] * len(node.outputs)


def _first_only(node: ir.Node) -> list[ir.Value | None]:
    # fused attention: output 0 is [B, S, heads * head_size] like the packed query; the
    # present key/value are graph outputs with declared shapes
    return [node.inputs[0]] + [None] * (len(node.outputs) - 1)


# contrib op -> the input each output takes its shape and type from (MatMulNBits: see below)
_LIKE_INPUT = {
    "GroupQueryAttention": _first_only,
    "MultiHeadAttention": _first_only,
    "RotaryEmbedding": _same_as_input,
    "SimplifiedLayerNormalization": _same_as_input,
    "SkipSimplifiedLayerNormalization": _same_as_input,
    "SkipLayerNormalization": _same_as_input,
    "FastGelu": _same_as_input,
    "QuickGelu": _same_as_input,
}


# quantized MatMuls: [..., K] x [K, N] -> [..., N], of the type of the input named (by position)
_MATMULS = {"MatMulNBits": 0, "DynamicQuantizeMatMul": 0, "MatMulIntegerToFloat": 2}


def _contrib(node: ir.Node) -> bool:
    """Output shapes set for a contrib op; False when ``node`` is not one handled here."""
    if node.op_type in _MATMULS and node.domain == "com.microsoft":
        x, out = node.inputs[0], node.outputs[0]
        n = node.attributes.get_int("N", None) if node.op_type == "MatMulNBits" else (
            node.inputs[1].shape[-1] if node.inputs[1].shape is not None else None)
        out.dtype = node.inputs[_MATMULS[node.op_type]].dtype
        if x.shape is not None and isinstance(n, int):
            out.shape = ir.Shape([*x.shape[:-1], n])
        return True
    rule = _LIKE_INPUT.get(node.op_type)
    if rule is None or node.domain not in ("", "ai.onnx", "com.microsoft"):
        return False
    if node.domain in ("", "ai.onnx") and node.op_type not in ("SimplifiedLayerNormalization",):
        return False  # a standard op of that name: ONNX infers it
    for out, like in zip(node.outputs, rule(node), strict=False):
        if out is not None and like is not None and not out.is_graph_output():
            out.dtype, out.shape = like.dtype, like.shape
    return True


def _onnx_node(node: ir.Node, opsets: dict[str, int]) -> None:
    def type_of(value: ir.Value) -> onnx.TypeProto | None:
        if value.type is None:
            return None
        proto = ir.serde.serialize_type(value.type)
        if value.shape is not None:
            ir.serde.serialize_shape_into(proto, value.shape)
        return proto

    inputs = [v for v in node.inputs if v is not None]
    types = {v.name: type_of(v) for v in inputs}
    if any(t is None for t in types.values()):
        return
    constants = {v.name: constant_tensor(v) for v in inputs}
    data = {name: ir.serde.serialize_tensor(t) for name, t in constants.items() if t is not None and t.size <= _SMALL}
    try:
        schema = onnx.defs.get_schema(node.op_type, opsets.get(node.domain, 1), node.domain)
        inferred = onnx.shape_inference.infer_node_outputs(schema, ir.serde.serialize_node(node), types, data)
    except Exception as exc:  # noqa: BLE001 - no schema, or inference refuses: the value stays shapeless
        logger.debug("no shape inference for %s: %s", node.name, exc)
        return
    for out in node.outputs:
        if out.name in inferred and not out.is_graph_output():
            out.type = ir.serde.deserialize_type_proto_for_type(inferred[out.name])
            out.shape = ir.serde.deserialize_type_proto_for_shape(inferred[out.name])


def infer_shapes(model: ir.Model) -> None:
    """Recompute the type and shape of every node output (see the module doc)."""
    common.TopologicalSortPass()(model)
    opsets = {("" if d == "ai.onnx" else d): v for d, v in model.opset_imports.items()}
    for node in model.graph:
        for out in node.outputs:
            if not out.is_graph_output():
                out.shape = None
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = node.attributes.get("value")
            if value is not None and isinstance(value.value, ir.TensorProtocol):
                node.outputs[0].dtype, node.outputs[0].shape = value.value.dtype, value.value.shape
                continue
        if not _contrib(node):
            _onnx_node(node, opsets)
