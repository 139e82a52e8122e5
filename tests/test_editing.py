"""onnxpress.editing and the two constant readers: edits checked by running the edited graph in
ONNX Runtime, read values against what ONNX Runtime computes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxpress.activations import Tap
from onnxpress.analysis.graph_utils import const_array, stored_array
from onnxpress.editing import GraphEditor, add_initializer
from onnxpress.model_io import model_proto
from onnxpress.runtime import make_session

RNG = np.random.default_rng(0)
W = RNG.standard_normal((4, 4)).astype(np.float32)
BIAS = RNG.standard_normal(4).astype(np.float32)
X = RNG.standard_normal((3, 4)).astype(np.float32)


def _model() -> ir.Model:
    """y1 = x @ w + c, y2 = x @ w (w shared by two MatMuls; c a Constant node),
    y3 = Reshape(x, Concat(Cast(a), b)) (a shape folded from constants), z a graph input with a default."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h1"], name="mm1"),
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(BIAS)),
        helper.make_node("Add", ["h1", "c"], ["y1"], name="add"),
        helper.make_node("MatMul", ["x", "w"], ["y2"], name="mm2"),
        helper.make_node("Cast", ["a"], ["a64"], to=TensorProto.INT64),
        helper.make_node("Concat", ["a64", "b"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y3"], name="reshape"),
        helper.make_node("Mul", ["y2", "z"], ["y4"], name="mul"),
    ]
    graph = helper.make_graph(
        nodes, "edits",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y1", "y2", "y3", "y4")],
        [numpy_helper.from_array(W, "w"), numpy_helper.from_array(np.array([2], np.int32), "a"),
         numpy_helper.from_array(np.array([6], np.int64), "b"), numpy_helper.from_array(np.array(1.5, np.float32), "z")],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def _run(model: ir.Model) -> dict[str, np.ndarray]:
    session = make_session(model)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"x": X}), strict=True))


def _nodes(model):
    return {n.name: n for n in model.graph}


def test_shared_constant_edited_for_some_readers_gets_a_new_initializer():
    model = _model()
    editor = GraphEditor(model)
    nodes, w = _nodes(model), model.graph.initializers["w"]
    w2 = 2 * W
    new = editor.set_constant(w, w2, users=[nodes["mm1"]])
    assert new is not w and new.name not in ("w", None) and new.name in model.graph.initializers
    assert nodes["mm1"].inputs[1] is new and nodes["mm2"].inputs[1] is w  # the other reader keeps the old
    assert new.dtype == ir.DataType.FLOAT and tuple(new.shape) == (4, 4)
    out = _run(model)
    np.testing.assert_allclose(out["y1"], X @ w2 + BIAS, rtol=1e-6)
    np.testing.assert_allclose(out["y2"], X @ W, rtol=1e-6)

    # a constant only the listed readers use is changed in place: no new value
    assert editor.set_constant(new, 3 * W, users=[nodes["mm1"]]) is new
    assert editor.set_constant(nodes["add"].inputs[1], -BIAS) is nodes["add"].inputs[1]  # the Constant node
    n_inits = len(model.graph.initializers)
    out = _run(model)
    np.testing.assert_allclose(out["y1"], X @ (3 * W) - BIAS, rtol=1e-6)

    # a value folded from constants (the Reshape target): its reader gets a new initializer
    shape = nodes["reshape"].inputs[1]
    new_shape = editor.set_constant(shape, np.array([4, 3], np.int64), users=[nodes["reshape"]])
    assert new_shape is not shape and len(model.graph.initializers) == n_inits + 1
    assert _run(model)["y3"].shape == (4, 3)


def test_add_initializer_names_uniquely_and_types_the_value():
    model = _model()
    editor = GraphEditor(model)
    taken = {"h1", "w", "x", "shape", "mm1"}  # a node output, an initializer, a graph input, a node name
    made = [editor.add_initializer(name, np.full((2, 3), i, np.float16)) for i, name in enumerate(sorted(taken))]
    made.append(editor.add_initializer("h1", np.array(0.5, np.float32)))  # 0-d stays 0-d
    made.append(add_initializer(model.graph, "h1", np.arange(3, dtype=np.int64)))  # the one-off form
    names = [v.name for v in made]
    assert len(set(names)) == len(names) and not taken & set(names)
    assert names[-2:] == ["h1_2", "h1_3"]
    all_names = [v.name for n in model.graph for v in n.outputs] + [v.name for v in model.graph.inputs]
    assert not set(all_names) & set(names)
    for v in made:
        assert v.is_initializer() and model.graph.initializers[v.name] is v
        assert v.dtype == v.const_value.dtype and tuple(v.shape) == tuple(v.const_value.shape)
    assert tuple(made[-2].shape) == () and made[-1].dtype == ir.DataType.INT64

    # serialised, shape inference and ONNX Runtime see typed values: y5 = y2 * scalar
    mul = ir.node("Mul", [_nodes(model)["mm2"].outputs[0], made[-2]], name="scale")
    model.graph.append(mul)
    mul.outputs[0].name = editor.fresh_name("y5")
    model.graph.outputs.append(mul.outputs[0])
    inferred = onnx.shape_inference.infer_shapes(model_proto(model), strict_mode=True)
    assert {o.name: o.type.tensor_type.elem_type for o in inferred.graph.output}["y5"] == TensorProto.FLOAT
    np.testing.assert_allclose(_run(model)["y5"], 0.5 * (X @ W), rtol=1e-6)

    fed = editor.add_input("x", ir.DataType.FLOAT, [3, "n"])
    assert fed.name == "x_2" and fed in model.graph.inputs and fed.dtype == ir.DataType.FLOAT  # x_1: above


def test_constant_readers_stored_and_folded():
    model = _model()
    nodes = _nodes(model)
    const = nodes["add"].inputs[1]
    shape = nodes["reshape"].inputs[1]
    z = nodes["mul"].inputs[1]
    # stored: the data an initializer or Constant holds, nothing computed, no graph input
    np.testing.assert_array_equal(stored_array(model.graph.initializers["w"]), W)
    np.testing.assert_array_equal(stored_array(const), BIAS)
    assert stored_array(shape) is None and stored_array(z) is None and stored_array(None) is None
    # folded: what the node sees, equal to what ONNX Runtime computes for that value
    np.testing.assert_array_equal(const_array(const), BIAS)
    folded = const_array(shape)
    got = {}
    Tap(model, [shape.name]).stream([{"x": X}], lambda name, array, feeds: got.__setitem__(name, array))
    assert folded.dtype == got[shape.name].dtype
    np.testing.assert_array_equal(folded, got[shape.name])
    assert const_array(z) is None  # a graph input may be fed: never constant
    assert const_array(nodes["add"].outputs[0]) is None


@pytest.mark.parametrize("array", [np.array(3.0, np.float32), np.arange(6, dtype=np.int8).reshape(2, 3)[:, ::2]])
def test_initializer_data_round_trips_through_ort(array):
    """Scalars and non-contiguous slices are stored as given (ORT reads them back unchanged)."""
    graph = ir.Graph([], [], nodes=[], opset_imports={"": 17}, name="g")
    model = ir.Model(graph, ir_version=8)
    value = GraphEditor(model).add_initializer("c", array)
    node = ir.node("Identity", [value], name="id")
    graph.append(node)
    graph.outputs.append(node.outputs[0])
    node.outputs[0].name = "out"
    out = make_session(model).run(None, {})[0]
    assert out.shape == array.shape and out.dtype == array.dtype
    np.testing.assert_array_equal(out, array)
