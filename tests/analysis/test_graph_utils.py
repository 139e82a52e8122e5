"""Graph helpers, Linear recognition, norms and costs on small hand-built graphs."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxpress.analysis import analyze, as_linear, count_params, find_norms
from onnxpress.analysis.graph_utils import (
    const_array,
    const_scalar,
    find_weight,
    is_constant,
    shape_elements,
    walk_down,
    walk_up,
)


def _model(nodes, inputs, outputs, inits, opsets=(("", 17),)) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets], ir_version=9
    )
    return ir.serde.deserialize_model(proto)


def _vi(name, *shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def _node(model: ir.Model, name: str) -> ir.Node:
    return next(n for n in model.graph if n.name == name)


def test_constants_through_constant_identity_cast_and_shape_arithmetic():
    nodes = [
        helper.make_node(
            "Constant", [], ["c"], value=numpy_helper.from_array(np.array([4], np.int64)), name="c"
        ),
        helper.make_node("Identity", ["c"], ["ci"]),
        helper.make_node("Cast", ["ci"], ["cf"], to=TensorProto.FLOAT),
        helper.make_node("Shape", ["x"], ["sx"]),
        helper.make_node("Gather", ["sx", "zero"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "axes"], ["bu"]),
        helper.make_node("Concat", ["bu", "m1", "ci", "d16"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape"),
        helper.make_node("Mul", ["y", "cf"], ["z"], name="mul"),
    ]
    inits = [
        _init("zero", np.array(0, np.int64)),
        _init("axes", np.array([0], np.int64)),
        _init("m1", np.array([-1], np.int64)),
        _init("d16", np.array([16], np.int64)),
    ]
    model = _model(nodes, [_vi("x", "B", "S", 64)], [_vi("z", "B", "S", 4, 16)], inits)
    reshape, mul = _node(model, "reshape"), _node(model, "mul")
    assert const_scalar(mul.inputs[1]) == 4.0 and is_constant(mul.inputs[1])
    assert not is_constant(reshape.inputs[1]) and const_array(reshape.inputs[1]) is None
    assert shape_elements(reshape.inputs[1]) == [None, -1, 4, 16]
    assert [n.op_type for n, _ in walk_up(mul.outputs[0], lambda n: n.inputs[:1])] == ["Mul", "Reshape"]
    assert [n.op_type for n in walk_down(model.graph.inputs[0], lambda n: True)][:2] == ["Shape", "Reshape"]


def test_linear_forms_and_weights_behind_transpose_and_dequantize():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 16)).astype(np.float32)  # stored [d_out, d_in]
    q = rng.integers(-8, 8, (16, 8)).astype(np.int8)
    nodes = [
        helper.make_node("Transpose", ["w"], ["wt"]),  # no perm: reverse axes
        helper.make_node("MatMul", ["x", "wt"], ["a"], name="mm_t"),
        helper.make_node("Add", ["a", "b32"], ["ab"]),
        helper.make_node("Gemm", ["ab2", "g", "gb"], ["gg"], transB=1, name="gemm"),
        helper.make_node("Reshape", ["ab", "flat"], ["ab2"]),
        helper.make_node("DequantizeLinear", ["q", "qs"], ["qd"]),
        helper.make_node("MatMul", ["x", "qd"], ["qq"], name="mm_q"),
    ]
    inits = [
        _init("w", w),
        _init("b32", np.zeros(32, np.float32)),
        _init("g", np.zeros((8, 32), np.float32)),
        _init("gb", np.zeros(8, np.float32)),
        _init("flat", np.array([-1, 32], np.int64)),
        _init("q", q),
        _init("qs", np.array(0.1, np.float32)),
    ]
    model = _model(
        nodes, [_vi("x", "N", 16)], [_vi("gg", "N", 8), _vi("qq", "N", 8)], inits, opsets=(("", 19),)
    )
    lin = as_linear(_node(model, "mm_t"))
    assert (lin.d_in, lin.d_out, lin.transposed) == (16, 32, True)
    assert lin.weight.name == "w" and lin.bias.name == "b32" and lin.bias_node.op_type == "Add"
    assert lin.output is lin.bias_node.outputs[0]
    gemm = as_linear(_node(model, "gemm"))
    assert (gemm.d_in, gemm.d_out, gemm.transposed, gemm.bias.name, gemm.bias_node) == (
        32,
        8,
        True,
        "gb",
        None,
    )
    lq = as_linear(_node(model, "mm_q"))
    assert (lq.d_in, lq.d_out, lq.weight.name) == (16, 8, "q")
    assert find_weight(_node(model, "mm_q").inputs[1])[2][0].op_type == "DequantizeLinear"
    # quantization scale is metadata; the int8 weight counts
    assert count_params(model) == w.size + 32 + 8 * 32 + 8 + q.size


def test_matmul_nbits_counts_logical_weights():
    k, n, block = 64, 32, 32
    packed = np.zeros((n, k // block, block // 2), np.uint8)
    nodes = [
        helper.make_node(
            "MatMulNBits",
            ["x", "B", "scales"],
            ["y"],
            domain="com.microsoft",
            K=k,
            N=n,
            bits=4,
            block_size=block,
            name="mmnb",
        )
    ]
    inits = [_init("B", packed), _init("scales", np.ones(n * (k // block), np.float32))]
    model = _model(
        nodes, [_vi("x", "N", k)], [_vi("y", "N", n)], inits, opsets=(("", 17), ("com.microsoft", 1))
    )
    lin = as_linear(_node(model, "mmnb"))
    assert (lin.d_in, lin.d_out, lin.transposed) == (k, n, True)
    assert count_params(model) == k * n


def test_decomposed_layer_norm_and_rms_norm():
    nodes = [
        # LayerNorm
        helper.make_node("ReduceMean", ["x"], ["mu"], axes=[-1]),
        helper.make_node("Sub", ["x", "mu"], ["xc"]),
        helper.make_node("Pow", ["xc", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["sd"]),
        helper.make_node("Div", ["xc", "sd"], ["xn"]),
        helper.make_node("Mul", ["xn", "gamma"], ["xg"]),
        helper.make_node("Add", ["xg", "beta"], ["ln"], name="ln_out"),
        # RMSNorm
        helper.make_node("Mul", ["ln", "ln"], ["sq2"]),
        helper.make_node("ReduceMean", ["sq2"], ["ms"], axes=[-1]),
        helper.make_node("Add", ["ms", "eps"], ["mse"]),
        helper.make_node("Sqrt", ["mse"], ["rms"]),
        helper.make_node("Reciprocal", ["rms"], ["inv"]),
        helper.make_node("Mul", ["ln", "inv"], ["rn"]),
        helper.make_node("Mul", ["gamma", "rn"], ["out"], name="rms_out"),
    ]
    inits = [
        _init("two", np.array(2.0, np.float32)),
        _init("eps", np.array(1e-5, np.float32)),
        _init("gamma", np.ones(8, np.float32)),
        _init("beta", np.zeros(8, np.float32)),
    ]
    model = _model(nodes, [_vi("x", "N", 8)], [_vi("out", "N", 8)], inits, opsets=(("", 17),))
    norms = find_norms(model.graph)
    assert [(nm.kind, nm.node.name, nm.input.name, nm.output.name) for nm in norms] == [
        ("LayerNorm", "ln_out", "x", "ln"),
        ("RMSNorm", "rms_out", "ln", "out"),
    ]
    assert [len(nm.weights) for nm in norms] == [2, 1]


def test_unrecognised_is_reported_in_plain_sentences():
    """A classifier Softmax is not attention, and a lone weight MatMul is no layer."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
        helper.make_node("Softmax", ["h"], ["p"], axis=-1, name="classifier_softmax"),
    ]
    model = _model(nodes, [_vi("x", "N", 8)], [_vi("p", "N", 4)], [_init("w", np.zeros((8, 4), np.float32))])
    tmap = analyze(model)
    assert tmap.layers == [] and not tmap.has_attention
    text = " | ".join(tmap.unrecognised)
    assert "classifier_softmax" in text and "not attention" in text
    assert "no attention block" in text
    assert tmap.params == 32 and tmap.macs == 32
