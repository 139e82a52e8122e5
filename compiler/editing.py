"""Graph edits the rewriting passes share: add or replace a constant (without disturbing
other readers of a shared one), split a matrix into two factors, drop what nothing reads."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common

from onnxpress.analysis.graph_utils import constant_tensor

if TYPE_CHECKING:
    from onnxpress.analysis.matrices import Matrix


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


def split_matrix(graph: ir.Graph, m: Matrix, a: np.ndarray | ir.Value, b: np.ndarray | ir.Value,
                 bias: np.ndarray | ir.Value | None) -> None:
    """Replace m.node by MatMul(x, A) -> MatMul(., B) (+ bias), in the original float dtype.

    MatMul + Add: the Add stays; its constant is replaced when the bias changed.
    Gemm: becomes MatMul, MatMul, Add(beta * C) (alpha is folded into B, transB into A).
    A, B and the bias may also be given as values (graph inputs, for the allocation probes).
    """
    np_dtype = m.dtype.numpy()
    stem = m.node.name or m.key

    def value(x, name):
        return x if isinstance(x, ir.Value) else add_initializer(graph, f"{stem}.{name}", x.astype(np_dtype))

    a_val, b_val = value(a, "lowrank_A"), value(b, "lowrank_B")
    first = ir.node("MatMul", [m.input, a_val], name=f"{stem}/lowrank_A")
    second = ir.node("MatMul", [first.outputs[0], b_val], name=f"{stem}/lowrank_B")
    new_nodes = [first, second]
    out = second.outputs[0]
    if bias is not None and m.bias_node is not None:  # MatMul + Add: the Add stays, with the new constant
        idx = next(i for i, v in enumerate(m.bias_node.inputs) if v is m.bias_value)
        m.bias_node.replace_input_with(idx, value(bias, "bias"))
    elif bias is not None:  # Gemm's C, or a bias correction where there was no bias: a new Add
        add = ir.node("Add", [out, value(bias, "bias")], name=f"{stem}/bias")
        new_nodes.append(add)
        out = add.outputs[0]
    old_out = m.node.outputs[0]
    for v in (first.outputs[0], second.outputs[0], out):
        v.dtype = m.dtype
    out.shape = old_out.shape
    ir.convenience.replace_nodes_and_values(graph, m.node, [m.node], new_nodes, [old_out], [out])
    drop_unused_initializers(graph, [v for v in (m.bias_value,) if v is not None])


class GraphEditor:
    """Replaces constants of a graph without disturbing other users of shared ones:
    a constant used only by the nodes being edited is changed in place, otherwise a
    new initializer is created for those nodes."""

    def __init__(self, model: ir.Model):
        self.model = model
        self.graph = model.graph
        self._names = {v.name for n in self.graph for v in (*n.inputs, *n.outputs) if v is not None}
        self._names |= set(self.graph.initializers)
        self._names |= {v.name for v in self.graph.inputs}

    def fresh_name(self, base: str) -> str:
        i = 0
        while f"{base}_pruned{i}" in self._names:
            i += 1
        name = f"{base}_pruned{i}"
        self._names.add(name)
        return name

    def set_constant(self, value: ir.Value, array: np.ndarray, users: Iterable[ir.Node] | None = None) -> ir.Value:
        """Give ``value``'s readers among ``users`` (all readers when None) the data ``array``.

        ``value`` may also be computed from constants (folded shape arithmetic): its
        readers then get a new initializer."""
        user_ids = None if users is None else {id(n) for n in users}
        uses = list(value.uses())
        mine = [u for u in uses if user_ids is None or id(u.node) in user_ids]
        if not mine and user_ids is not None:
            mine = uses  # value reached only through nodes the caller did not list: it is theirs
        producer = value.producer()
        tensor = ir.tensor(np.ascontiguousarray(array))
        editable = value.is_initializer() or (producer is not None and producer.op_type == "Constant")
        if editable and len(mine) == len(uses) and not value.is_graph_output():
            if producer is not None and producer.op_type == "Constant":
                for key in [k for k in producer.attributes if k.startswith("value")]:
                    del producer.attributes[key]
                producer.attributes["value"] = ir.AttrTensor("value", tensor)
            else:
                value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)
            value.shape = ir.Shape(array.shape)
            return value
        new = ir.Value(name=self.fresh_name(value.name or "const"), shape=ir.Shape(array.shape),
                       type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
        new.const_value = ir.tensor(np.ascontiguousarray(array), name=new.name)
        self.graph.register_initializer(new)
        for use in mine:
            use.node.replace_input_with(use.idx, new)
        return new


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The stored array of an initializer or ``Constant`` output (no folding), else None."""
    tensor = constant_tensor(value)
    return None if tensor is None else tensor.numpy()
