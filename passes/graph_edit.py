"""Graph edits the rewriting passes share: add a constant, drop what nothing reads."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A new initializer holding ``array`` under ``name`` (suffixed when taken), typed and
    shaped so that serialisation and shape inference see it."""
    base, i = name, 0
    while name in graph.initializers:
        i += 1
        name = f"{base}_{i}"
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.type = ir.TensorType(value.const_value.dtype)
    value.shape = ir.Shape(array.shape)
    graph.register_initializer(value)
    return value


def drop_unused_initializers(graph: ir.Graph, values: list[ir.Value] | None = None) -> None:
    """Remove the given initializers (all of them when None) that no node reads any more."""
    for value in list(graph.initializers.values()) if values is None else values:
        if (value.name in graph.initializers and not list(value.uses())
                and not value.is_graph_output() and not value.is_graph_input()):
            del graph.initializers[value.name]


def remove_dead_nodes(model: ir.Model) -> None:
    common.RemoveUnusedNodesPass()(model)  # old weights, their Transposes and Constants
