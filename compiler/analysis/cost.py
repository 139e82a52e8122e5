"""Parameter and MAC counts, the yardsticks every pass reports before/after.

* ``count_params``: elements of the float and integer *weight* initializers. Index
  and shape tensors (int32/int64/bool) are not weights and are not counted.
  Quantized weights count at their logical size: a MatMulNBits ``B`` (uint8-packed
  ``[N, blocks, blob]``) counts ``K * N``; its scales / zero points, and those of
  DequantizeLinear, are quantization metadata and are not counted. Initializers
  shared through Identity count once.
* ``count_macs``: multiply-accumulates *per token* at ``seq_len``: every
  constant-weight MatMul / Gemm / MatMulNBits contributes ``d_in * d_out``, every
  attention block ``2 * seq_len * num_heads * head_size`` (scores and context).
"""

from __future__ import annotations

import onnx_ir as ir

from onnxpress.analysis.graph_utils import FLOAT_TYPES, constant_tensor, decode_body, numel

# Weights are float tensors or the integer storage of quantized ones.
_WEIGHT_TYPES = FLOAT_TYPES | {
    ir.DataType.INT8,
    ir.DataType.UINT8,
    ir.DataType.INT4,
    ir.DataType.UINT4,
    ir.DataType.INT16,
    ir.DataType.UINT16,
}
_MATMUL_NBITS_META = (2, 3)  # scales, zero_points
_DEQUANT_META = (1, 2)  # x_scale, x_zero_point


def count_params(model: ir.Model) -> int:
    """Weight elements of ``model`` (see module docstring for what counts)."""
    graph = model.graph
    override: dict[int, int] = {}
    skip: set[int] = set()
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            k, n = node.attributes.get_int("K"), node.attributes.get_int("N")
            if node.inputs[1] is not None and k and n:
                override[id(node.inputs[1])] = int(k) * int(n)
            for i in _MATMUL_NBITS_META:
                if len(node.inputs) > i and node.inputs[i] is not None:
                    skip.add(id(node.inputs[i]))
        elif node.op_type == "DequantizeLinear":
            for i in _DEQUANT_META:
                if len(node.inputs) > i and node.inputs[i] is not None:
                    skip.add(id(node.inputs[i]))
    total = 0
    for value in graph.initializers.values():
        if value.is_graph_input() or id(value) in skip:
            continue
        if id(value) in override:
            total += override[id(value)]
            continue
        tensor = value.const_value
        if tensor is None or tensor.dtype not in _WEIGHT_TYPES:
            continue
        total += numel(tensor.shape)
    # weights stored in Constant nodes (some exporters): large float tensors only
    for node in graph:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            tensor = constant_tensor(node.outputs[0])
            if (
                tensor is not None
                and tensor.dtype in _WEIGHT_TYPES
                and len(tensor.shape) >= 2
                and numel(tensor.shape) >= 256
                and _feeds_linear(node)
            ):
                total += numel(tensor.shape)
    return total


def _feeds_linear(node: ir.Node) -> bool:
    from onnxpress.analysis.linear import as_linear

    for use in node.outputs[0].uses():
        user = use.node
        if user.op_type in ("Identity", "Cast", "Transpose"):
            if any(as_linear(u.node) is not None for u in user.outputs[0].uses()):
                return True
        elif as_linear(user) is not None:
            return True
    return False


def linear_macs(model: ir.Model) -> int:
    """MACs per token of all constant-weight matrix products."""
    from onnxpress.analysis.linear import as_linear

    total = 0
    for node in decode_body(model).graph:
        lin = as_linear(node)
        if lin is not None:
            total += lin.d_in * lin.d_out
        elif node.op_type == "Attention" and node.domain == "com.microsoft":
            shape = constant_tensor(node.inputs[1])
            if shape is not None and len(shape.shape) == 2:
                total += int(shape.shape[0]) * int(shape.shape[1])
    return total


def attention_macs(num_heads: int, head_size: int, seq_len: int) -> int:
    """Per-token MACs of one attention core: q@k^T and p@v over ``seq_len`` keys."""
    return 2 * seq_len * num_heads * head_size


def count_macs(model: ir.Model, seq_len: int = 128, tmap=None) -> int:
    """MACs per token at ``seq_len`` (see module docstring); analyses the model
    when no map is given."""
    if tmap is None:
        from onnxpress.analysis.transformer import analyze

        tmap = analyze(model, seq_len=seq_len)
    total = linear_macs(model)
    for att in tmap.attentions():
        total += attention_macs(att.num_heads, att.head_size, seq_len)
    return total


__all__ = ["attention_macs", "count_macs", "count_params", "linear_macs"]
