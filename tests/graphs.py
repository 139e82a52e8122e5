"""Small hand-built ONNX graphs for tests that need no transformer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def mlp_model(d_in: int = 8, d_hidden: int = 16, seed: int = 0, *, dead_branch: bool = True) -> onnx.ModelProto:
    """x[B, d_in] -> Relu(x W1 + b1) W2, plus foldable constants and a dead branch for cleanup to find."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((d_in, d_hidden)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.standard_normal(d_hidden).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((d_hidden, d_in)).astype(np.float32), "w2")
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    nodes = [
        helper.make_node("Mul", ["two", "two"], ["four"]),  # foldable
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("Identity", ["h2"], ["h3"]),
        helper.make_node("MatMul", ["h3", "w2"], ["y0"]),
        helper.make_node("Div", ["y0", "four"], ["y"]),
    ]
    inits = [w1, b1, w2, two]
    if dead_branch:
        nodes.append(helper.make_node("Sigmoid", ["h1"], ["unused"]))
        inits.append(numpy_helper.from_array(np.zeros(3, np.float32), "unused_init"))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", d_in])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def save(model: onnx.ModelProto, path: Path, *, external: bool = False) -> Path:
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=0)
    return path
