"""Graph edits the rewriting passes share: create an initializer (or graph input) under a fresh
name, replace a constant without disturbing other readers of a shared one, split a matrix into
two factors, drop what nothing reads.

Constants are read with :func:`onnxpress.analysis.graph_utils.stored_array` (the data an
initializer or ``Constant`` holds) or :func:`~onnxpress.analysis.graph_utils.const_array` (folded
through small constant arithmetic); models are copied with ``model.clone()`` (weights shared).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common

if TYPE_CHECKING:
    from onnxpress.analysis.matrices import Matrix
    from onnxpress.model_io import WeightSpill

_spill: ContextVar[WeightSpill | None] = ContextVar("onnxpress_weight_spill", default=None)


@contextlib.contextmanager
def weights_spilled_to(spill: WeightSpill | None) -> Iterator[None]:
    """New weights made inside the block go to ``spill``'s file (None: stay in memory)."""
    token = _spill.set(spill)
    try:
        yield
    finally:
        _spill.reset(token)


def new_tensor(array: np.ndarray, name: str | None = None) -> ir.TensorProtocol:
    """A new weight's tensor: in the active spill file (``weights_spilled_to``) or in memory."""
    spill = _spill.get()
    return ir.tensor(array, name=name) if spill is None else spill.tensor(array, name)


class GraphEditor:
    """Edits of one graph that keep its value names unique.

    It indexes the graph's names once, so that many edits in a row (a pass rewriting every
    layer) do not scan the graph for each new name; values named by other code afterwards are
    not in the index, so name new values through :meth:`fresh_name` while one is kept."""

    def __init__(self, graph: ir.Graph | ir.Model):
        self.graph = graph.graph if isinstance(graph, ir.Model) else graph
        self.names = {v.name for n in self.graph for v in (*n.inputs, *n.outputs) if v is not None}
        self.names |= set(self.graph.initializers)
        self.names |= {v.name for v in self.graph.inputs}
        self.names |= {n.name for n in self.graph if n.name}

    def fresh_name(self, base: str) -> str:
        """``base``, or ``base_1``, ``base_2``...: the first name not used in the graph yet."""
        name, i = base, 0
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def add_initializer(self, name: str, array: np.ndarray) -> ir.Value:
        """A new initializer holding ``array`` under a fresh name from ``name``, typed and shaped
        so that serialisation and shape inference see it."""
        array = np.require(array, requirements="C")  # keeps 0-d scalars 0-d
        name = self.fresh_name(name)
        value = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         shape=ir.Shape(array.shape), const_value=new_tensor(array, name))
        self.graph.register_initializer(value)
        return value

    def add_input(self, name: str, dtype: ir.DataType, shape: Sequence[int | str | None]) -> ir.Value:
        """A new graph input under a fresh name from ``name`` (a tensor fed at run time)."""
        value = ir.Value(name=self.fresh_name(name), type=ir.TensorType(dtype), shape=ir.Shape(shape))
        self.graph.inputs.append(value)
        return value

    def set_constant(self, value: ir.Value, array: np.ndarray,
                     users: Iterable[ir.Node] | None = None) -> ir.Value:
        """Give ``value``'s readers among ``users`` (all readers when None) the data ``array``.

        A constant only those readers use is changed in place; otherwise (a constant shared
        with other nodes, a graph output, or a value computed from constants by folded shape
        arithmetic) those readers get a new initializer and the others keep the old value."""
        user_ids = None if users is None else {id(n) for n in users}
        uses = list(value.uses())
        mine = [u for u in uses if user_ids is None or id(u.node) in user_ids]
        if not mine and user_ids is not None:
            mine = uses  # value reached only through nodes the caller did not list: it is theirs
        producer = value.producer()
        array = np.require(array, requirements="C")
        editable = value.is_initializer() or (producer is not None and producer.op_type == "Constant")
        if editable and len(mine) == len(uses) and not value.is_graph_output():
            if producer is not None and producer.op_type == "Constant":
                for key in [k for k in producer.attributes if k.startswith("value")]:
                    del producer.attributes[key]
                producer.attributes["value"] = ir.AttrTensor("value", ir.tensor(array))
                if value.const_value is not None:  # folded earlier (onnx-ir): it would shadow the new data
                    value.const_value = ir.tensor(array)
            else:
                value.const_value = new_tensor(array, value.name)
            value.shape = ir.Shape(array.shape)
            value.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
            return value
        new = self.add_initializer(value.name or "const", array)
        for use in mine:
            use.node.replace_input_with(use.idx, new)
        return new


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """One new initializer (see :meth:`GraphEditor.add_initializer`); for many in a row, keep
    one :class:`GraphEditor`."""
    return GraphEditor(graph).add_initializer(name, array)


def editor_of(graph: ir.Graph | GraphEditor) -> GraphEditor:
    """``graph`` itself when it is an editor (a caller keeping one across many edits), else a new one."""
    return graph if isinstance(graph, GraphEditor) else GraphEditor(graph)


def drop_unused_initializers(graph: ir.Graph, values: list[ir.Value] | None = None) -> None:
    """Remove the given initializers (all of them when None) that no node reads any more."""
    for value in list(graph.initializers.values()) if values is None else values:
        if (value.name in graph.initializers and not list(value.uses())
                and not value.is_graph_output() and not value.is_graph_input()):
            del graph.initializers[value.name]


def remove_dead_nodes(model: ir.Model) -> None:
    common.RemoveUnusedNodesPass()(model)  # old weights, their Transposes and Constants


def split_matrix(graph: ir.Graph | GraphEditor, m: Matrix, a: np.ndarray | ir.Value, b: np.ndarray | ir.Value,
                 bias: np.ndarray | ir.Value | None) -> None:
    """Replace m.node by MatMul(x, A) -> MatMul(., B) (+ bias), in the original float dtype.

    MatMul + Add: the Add stays; its constant is replaced when the bias changed.
    Gemm: becomes MatMul, MatMul, Add(beta * C) (alpha is folded into B, transB into A).
    A, B and the bias may also be given as values (graph inputs, for the allocation probes).
    ``graph`` may be an editor of the graph (passes splitting many matrices keep one).
    """
    editor = editor_of(graph)
    graph = editor.graph
    np_dtype = m.dtype.numpy()
    stem = m.node.name or m.key

    def value(x, name):
        return x if isinstance(x, ir.Value) else editor.add_initializer(f"{stem}.{name}", x.astype(np_dtype))

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
