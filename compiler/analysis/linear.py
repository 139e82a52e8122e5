"""Recognise ``x @ W (+ b)`` with a constant ``W``, however the exporter spelled it.

MatMul with a constant right operand (maybe behind Identity/Cast/Transpose/
DequantizeLinear), Gemm (``transB`` means the stored weight is [d_out, d_in]),
com.microsoft MatMulNBits / FusedMatMul, and the integer MatMuls quantization leaves
(MatMulInteger, MatMulIntegerToFloat, DynamicQuantizeMatMul: int8 ``B`` as stored,
[d_in, d_out]). A bias is the single following ``Add`` of
a constant vector of size ``d_out``.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxpress.analysis.graph_utils import (
    constant_tensor,
    data_consumers,
    find_weight,
    is_constant,
    tensor_shape,
)
from onnxpress.analysis.structures import Linear


def as_linear(node: ir.Node) -> Linear | None:
    """A :class:`Linear` when ``node`` multiplies an activation by a constant matrix."""
    op, domain = node.op_type, node.domain
    if op == "MatMul" and domain in ("", "ai.onnx"):
        return _matmul(node, trans_b=False)
    if op == "FusedMatMul" and domain == "com.microsoft":
        attrs = node.attributes
        if attrs.get_int("transA", 0) or attrs.get_int("transBatchA", 0) or attrs.get_int("transBatchB", 0):
            return None
        return _matmul(node, trans_b=bool(attrs.get_int("transB", 0)))
    if op == "Gemm" and domain in ("", "ai.onnx"):
        return _gemm(node)
    if op == "MatMulNBits" and domain == "com.microsoft":
        return _matmul_nbits(node)
    if (domain or "", op) in _INTEGER_MATMUL_BIAS:
        return _integer_matmul(node, _INTEGER_MATMUL_BIAS[(domain or "", op)])
    return None


# (domain, op) -> input index of the fused bias (None: no bias input)
_INTEGER_MATMUL_BIAS = {
    ("", "MatMulInteger"): None,
    ("com.microsoft", "MatMulIntegerToFloat"): 6,
    ("com.microsoft", "DynamicQuantizeMatMul"): 4,
}


def is_linear(node: ir.Node) -> bool:
    return as_linear(node) is not None


def _weight_of(node: ir.Node, trans_b: bool):
    """(weight, transposed, via, d_in, d_out) of a MatMul/Gemm's constant right operand, or None."""
    if len(node.inputs) < 2 or node.inputs[0] is None or is_constant(node.inputs[0]):
        return None
    found = find_weight(node.inputs[1])
    if found is None:
        return None
    weight, transposed, via = found
    shape = tensor_shape(weight)
    if shape is None or len(shape) != 2:
        return None
    transposed = transposed != trans_b
    d_in, d_out = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
    return weight, transposed, via, d_in, d_out


def _make_linear(node, weight, transposed, via, d_in, d_out, bias, bias_node) -> Linear:
    return Linear(
        node=node,
        weight=weight,
        bias=bias,
        bias_node=bias_node,
        d_in=d_in,
        d_out=d_out,
        transposed=transposed,
        input=node.inputs[0],
        output=bias_node.outputs[0] if bias_node is not None else node.outputs[0],
        weight_via=via,
    )


def _matmul(node: ir.Node, trans_b: bool) -> Linear | None:
    found = _weight_of(node, trans_b)
    if found is None:
        return None
    weight, transposed, via, d_in, d_out = found
    bias, bias_node = _following_bias(node.outputs[0], d_out)
    return _make_linear(node, weight, transposed, via, d_in, d_out, bias, bias_node)


def _gemm(node: ir.Node) -> Linear | None:
    if node.attributes.get_int("transA", 0):
        return None
    found = _weight_of(node, bool(node.attributes.get_int("transB", 0)))
    if found is None:
        return None
    weight, transposed, via, d_in, d_out = found
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if bias is not None and not is_constant(bias):
        return None
    bias_node = None
    if bias is None:
        bias, bias_node = _following_bias(node.outputs[0], d_out)
    return _make_linear(node, weight, transposed, via, d_in, d_out, bias, bias_node)


def _matmul_nbits(node: ir.Node) -> Linear | None:
    k, n = node.attributes.get_int("K"), node.attributes.get_int("N")
    if k is None or n is None or node.inputs[0] is None or constant_tensor(node.inputs[1]) is None:
        return None
    bias = node.inputs[5] if len(node.inputs) > 5 and node.inputs[5] is not None else None
    bias_node = None
    if bias is None:
        bias, bias_node = _following_bias(node.outputs[0], int(n))
    return Linear(
        node=node,
        weight=node.inputs[1],
        bias=bias,
        bias_node=bias_node,
        d_in=int(k),
        d_out=int(n),
        transposed=True,
        input=node.inputs[0],
        output=bias_node.outputs[0] if bias_node is not None else node.outputs[0],
    )


def _integer_matmul(node: ir.Node, bias_index: int) -> Linear | None:
    shape = tensor_shape(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if node.inputs[0] is None or shape is None or len(shape) != 2 or not is_constant(node.inputs[1]):
        return None
    d_in, d_out = int(shape[0]), int(shape[1])
    bias = node.inputs[bias_index] if bias_index is not None and len(node.inputs) > bias_index else None
    bias_node = None
    if bias is None:
        bias, bias_node = _following_bias(node.outputs[0], d_out)
    return _make_linear(node, node.inputs[1], False, [], d_in, d_out, bias, bias_node)


def _following_bias(out: ir.Value, d_out: int) -> tuple[ir.Value | None, ir.Node | None]:
    """The bias ``Add`` right after a MatMul: its only data consumer, adding a constant
    whose shape broadcasts as a [d_out] vector."""
    users = data_consumers(out)
    if len(users) != 1 or users[0].op_type != "Add" or out.is_graph_output():
        return None, None
    add = users[0]
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    if other is None or other is out or not is_constant(other):
        return None, None
    shape = tensor_shape(other)
    if shape is None:
        from onnxpress.analysis.graph_utils import const_array

        arr = const_array(other)
        shape = arr.shape if arr is not None else None
    if shape is None or not shape or shape[-1] != d_out or any(d != 1 for d in shape[:-1]):
        return None, None
    return other, add


class LinearIndex:
    """Every constant-weight projection of the graph, by node and by output value."""

    def __init__(self, graph: ir.Graph):
        self.by_node: dict[int, Linear] = {}
        self.by_value: dict[int, Linear] = {}
        self.ordered: list[Linear] = []
        for node in graph:
            lin = as_linear(node)
            if lin is None:
                continue
            self.by_node[id(node)] = lin
            self.ordered.append(lin)
            self.by_value[id(node.outputs[0])] = lin
            self.by_value[id(lin.output)] = lin

    def for_value(self, value: ir.Value | None) -> Linear | None:
        return None if value is None else self.by_value.get(id(value))

    def for_node(self, node: ir.Node | None) -> Linear | None:
        return None if node is None else self.by_node.get(id(node))
