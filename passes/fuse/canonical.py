"""Exact rewrites that put exported graphs into the form onnxscript's ORT fusion rules match.

Exporters spell shapes with ``Shape -> Gather -> Unsqueeze -> Concat`` even where the
dimension is static or is the reshaped tensor's own, and RMSNorm with ``Div(1, Sqrt)``
where onnxscript's rule expects ``Reciprocal``. Our rules undo that:

* ``StaticDim``: ``Gather(Shape(x), i)`` with ``x``'s dim ``i`` static -> that constant
  (onnxscript's folder only folds 1-D indices; exporters gather with scalars);
* ``ReshapeOwnDims``: a ``Reshape`` whose target shape copies its input's own dims
  (``x.view(batch, seq, -1, head_size)``) -> a constant target with 0 (copy) in their place,
  so shape inference knows the head count and the ``Shape`` arithmetic goes dead;
* ``ShapeOfOrigin``: a one-dim ``Shape`` read -> the same read of the tensor the dim is a copy
  of, so reads of values a fusion removes do not keep them alive, and the layers' reads of the
  batch, sequence and cache lengths become the same (merged by common-subexpression elimination);
* ``ReciprocalOfDiv``: ``Div(1, x)`` -> ``Reciprocal(x)`` (the same IEEE division);

with onnxscript's own no-op removals. Which dim is a copy of which is read from the graph
(``_dim_origin``), not from shape inference alone, which loses dims to broadcasts.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.common import (
    add_0_rule,
    collapse_slice2_rule,
    collapse_slice_rule,
    div_by_1_rule,
    mul_by_1_rule,
    no_op_cast_rule,
    no_op_expand_rule,
    no_op_transpose_rule,
    sub_0_rule,
)

from onnxpress.analysis.graph_utils import const_array, const_scalar, is_constant, numel, producer


def _dim_source(value: ir.Value) -> tuple[ir.Value, int] | None:
    """(x, i) when ``value`` holds dim ``i`` of ``x`` as exporters spell it: ``Gather(Shape(x), i)``
    (scalar or one-element index), ``Shape(x, start=i, end=i+1)``, or an ``Unsqueeze`` of one."""
    node = producer(value)
    if node is None:
        return None
    if node.op_type == "Unsqueeze":
        return _dim_source(node.inputs[0])
    if node.op_type == "Shape" and node.inputs[0] is not None:
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", None)
        shape = node.inputs[0].shape
        if shape is None:
            return None
        rank = len(shape)
        start = start + rank if start < 0 else start
        end = rank if end is None else (end + rank if end < 0 else min(end, rank))
        return (node.inputs[0], start) if end - start == 1 else None
    if node.op_type == "Gather" and node.attributes.get_int("axis", 0) == 0:
        shape_node = producer(node.inputs[0])
        if shape_node is None or shape_node.op_type != "Shape":
            return None
        index = const_array(node.inputs[1])
        if index is None or index.size != 1:
            return None
        x = shape_node.inputs[0]
        if x is None or x.shape is None:
            return None
        rank = len(x.shape)
        start = shape_node.attributes.get_int("start", 0)
        start = start + rank if start < 0 else start
        i = int(index.reshape(-1)[0])
        end = shape_node.attributes.get_int("end", None)
        end = rank if end is None else (end + rank if end < 0 else min(end, rank))
        i = i + (end - start) if i < 0 else i
        return (x, start + i) if 0 <= start + i < rank else None
    return None


def named_dim(dim: ir.SymbolicDim) -> bool:
    """A symbolic dim that names one size: a graph input's or one propagated from it. ONNX shape
    inference names each unknown ``unk__N`` afresh per run, so two such names may be different sizes."""
    return dim.value is not None and not dim.value.startswith("unk__")


def _static(dim) -> int | None:
    return dim if isinstance(dim, int) else None


def same_dim(x: ir.Value, j: int, y: ir.Value, i: int) -> bool:
    """Dim ``j`` of ``x`` is dim ``i`` of ``y``: the same static size or named symbolic dim, or
    copies of the same earlier dim (``_dim_origin``), which holds where shape inference lost a
    dim to a broadcast."""
    mine = x.shape[j] if x.shape is not None and j < len(x.shape) else None
    theirs = y.shape[i] if y.shape is not None and i < len(y.shape) else None
    if isinstance(mine, int) and mine == theirs:
        return True
    if isinstance(mine, ir.SymbolicDim) and named_dim(mine) and mine == theirs:
        return True
    return _dim_origin(x, j) == _dim_origin(y, i)


class StaticDim(pattern.RewriteRuleClassBase):
    def pattern(self, op, data, index):
        return op.Gather(data, index, _allow_other_attributes=True, _outputs=["dim"])

    def check(self, context, dim, index, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        source = _dim_source(dim)
        if source is None:
            return result.fail("not a dim gathered from Shape")
        x, i = source
        self._value = _static(x.shape[i])
        if self._value is None:
            return result.fail(f"dim {i} of {x.name} is not static", x)
        self._scalar = const_array(index).ndim == 0
        return result

    def rewrite(self, op, **_):
        value = np.array(self._value if self._scalar else [self._value], np.int64)
        return op.Constant(value=ir.tensor(value))


class ReshapeOwnDims(pattern.RewriteRuleClassBase):
    def pattern(self, op, x, shape):
        return op.Reshape(x, shape, _allow_other_attributes=True, _outputs=["reshaped"])

    def check(self, context, x, shape, reshaped, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if reshaped.producer().attributes.get_int("allowzero", 0) != 0:
            return result.fail("allowzero=1: a 0 would not copy the input's dim")
        if const_array(shape) is not None:
            return result.fail("the target shape is already constant")
        concat = producer(shape)
        if concat is None or concat.op_type != "Concat" or x.shape is None:
            return result.fail("the target shape is not a Concat of dims", shape)
        dims: list[int] = []
        for j, part in enumerate(concat.inputs):
            constant = const_array(part)
            if constant is not None:
                if constant.size != 1:
                    return result.fail("a multi-element constant in the target shape", part)
                dims.append(int(constant.reshape(-1)[0]))
                continue
            source = _dim_source(part)
            if source is None or j >= len(x.shape):
                return result.fail(f"target dim {j} is not a dim of a tensor", part)
            y, i = source
            if not same_dim(x, j, y, i):
                return result.fail(f"target dim {j} is not the input's dim {j}", part)
            dims.append(0)
        self._dims = dims
        return result

    def rewrite(self, op, x, **_):
        return op.Reshape(x, op.Constant(value=ir.tensor(np.array(self._dims, np.int64))))


# a [..., K] input times a 2-D [K, N] weight: the leading dims pass through (quantized ones too)
_PROJECTIONS = frozenset({"MatMul", "MatMulNBits", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"})
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Sigmoid", "Neg", "Sqrt", "Reciprocal", "Where"})


def _broadcast_source(node: ir.Node, value: ir.Value, i: int) -> ir.Value | None:
    """An operand of an elementwise ``node`` whose dim ``i`` is its output's: one of the output's
    rank that every other operand leaves alone at ``i`` (lower rank, or a static 1 there), or one
    with the same static size or named dim as the output there."""
    out = value.shape
    if out is None or i >= len(out):
        return None
    operands = [v for v in node.inputs if v is not None]
    if any(v.shape is None for v in operands):
        return None
    for operand in operands:
        if len(operand.shape) != len(out) or is_constant(operand):
            continue
        others = [v for v in operands if v is not operand]
        if all(len(v.shape) < len(out) - i or v.shape[i - len(out) + len(v.shape)] == 1 for v in others):
            return operand
        if (isinstance(out[i], int) or named_dim(out[i])) and operand.shape[i] == out[i]:
            return operand
    return None


def _dim_origin(value: ir.Value, i: int) -> tuple[ir.Value, int]:
    """The earliest (tensor, dim) that dim ``i`` of ``value`` is a copy of, walking back through
    ops that move dims without changing them: Transpose, Reshape's copied (0) dims, projections
    (MatMul by a 2-D weight, MatMulNBits), shape-keeping ops (norms, rotary, fused attention's
    leading dims, Cast) and the embedding Gather (its leading dims are the ids')."""
    for _ in range(10_000):
        node = producer(value)
        if node is None or node.domain not in ("", "ai.onnx", "com.microsoft"):
            return value, i
        op, source = node.op_type, node.inputs[0] if node.inputs else None
        rank = len(source.shape) if source is not None and source.shape is not None else None
        if op == "Transpose":
            perm = node.attributes.get_ints("perm", None)
            if perm is None or i >= len(perm):
                return value, i
            i = perm[i]
        elif op == "Reshape":
            target = const_array(node.inputs[1])
            if (node.attributes.get_int("allowzero", 0) != 0 or target is None or i >= target.size
                    or int(target.reshape(-1)[i]) != 0):
                return value, i
        elif op in _PROJECTIONS:
            weight = node.inputs[1]
            two_d = op == "MatMulNBits" or (weight is not None and weight.shape is not None and len(weight.shape) == 2)
            if not two_d or rank is None or i >= rank - 1:
                return value, i
        elif op in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding",
                    "Cast", "Identity") or (op == "DynamicQuantizeLinear" and value is node.outputs[0]):
            if op == "SkipSimplifiedLayerNormalization" and value not in (node.outputs[0], node.outputs[-1]):
                return value, i
        elif op == "GroupQueryAttention" and value is node.outputs[0] and i < 2:
            pass
        elif op in _ELEMENTWISE:
            source = _broadcast_source(node, value, i)
            if source is None:
                return value, i
        elif op == "Gather" and node.attributes.get_int("axis", 0) == 0 and i < len(node.inputs[1].shape or ()):
            source = node.inputs[1]
        else:
            return value, i
        value = source
    return value, i


def _first_declaration(graph: ir.Graph | ir.Function, value: ir.Value, i: int) -> tuple[ir.Value, int]:
    """For a graph input's named dim, the first graph input declaring a dim of that name: inputs
    declared with the same dim name have the same size (every layer's cache is as long as the
    first's, as the graph itself assumes when it sizes the causal mask from the first)."""
    if not value.is_graph_input() or value.shape is None or not isinstance(value.shape[i], ir.SymbolicDim):
        return value, i
    name = value.shape[i]
    if not named_dim(name):
        return value, i
    for candidate in graph.inputs:
        if candidate.shape is not None and name in list(candidate.shape):
            return candidate, list(candidate.shape).index(name)
    return value, i


class ShapeOfOrigin(pattern.RewriteRuleClassBase):
    """``Shape(v, start=i, end=i+1)`` -> the same read of the tensor the dim was copied from
    (``_dim_origin``), or of the first graph input declaring it (``_first_declaration``): reads of
    intermediates (rotated keys, packed queries) no longer keep them alive, and each layer's reads
    of the batch, sequence and cache lengths become the same, merged into one for all layers."""

    def pattern(self, op, value):
        return op.Shape(value, _allow_other_attributes=True, _outputs=["dims"])

    def check(self, context, value, dims, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        node = dims.producer()
        if value.shape is None:
            return result.fail("the shape's rank is unknown", value)
        rank = len(value.shape)
        start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", rank)
        start, end = start + rank if start < 0 else start, min(end + rank if end < 0 else end, rank)
        if end - start != 1:
            return result.fail("not a one-dim read", dims)
        self._origin = _first_declaration(context.graph_or_function, *_dim_origin(value, start))
        if self._origin == (value, start):
            return result.fail("the dim is not a copy of an earlier one", value)
        return result

    def rewrite(self, op, **_):
        source, i = self._origin
        return op.Shape(source, start=i, end=i + 1)


class ReciprocalOfDiv(pattern.RewriteRuleClassBase):
    def pattern(self, op, one, x):
        return op.Div(one, x)

    def check(self, context, one, x, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        # the shape first: a weight divided by x would otherwise be read whole
        if one.shape is None or not one.shape.is_static() or numel(one.shape) != 1 or const_scalar(one) != 1.0:
            return result.fail("numerator is not the constant 1", one)
        if x.dtype is None or not x.dtype.is_floating_point():
            return result.fail("not a float division", x)
        if x.shape is None or len(one.shape) > len(x.shape):
            return result.fail("the constant would broadcast the result", one)
        return result

    def rewrite(self, op, x, **_):
        return op.Reciprocal(x)


# with onnxscript's no-op removals (the exporters' Mul by a rotary attention_scaling of 1, Casts
# to the type a value has, Phi-3's slice of the whole head as the rotated part): the fusion
# patterns do not expect them
RULES = pattern.RewriteRuleSet([
    StaticDim.rule(), ReshapeOwnDims.rule(), ReciprocalOfDiv.rule(), ShapeOfOrigin.rule(),
    *mul_by_1_rule.commute(), *add_0_rule.commute(), sub_0_rule, div_by_1_rule,
    no_op_cast_rule, no_op_expand_rule, no_op_transpose_rule, collapse_slice_rule, collapse_slice2_rule,
])



def spell_defaults(graph: ir.Graph) -> None:
    """Write out the attributes onnxscript's patterns name but exporters leave at their default
    (the pattern matcher wants them present): ReduceMean's ``noop_with_empty_axes`` (opset 18+,
    axes as an input)."""
    for node in graph:
        if node.op_type == "ReduceMean" and node.domain in ("", "ai.onnx") and len(node.inputs) > 1:
            if "noop_with_empty_axes" not in node.attributes:
                node.attributes["noop_with_empty_axes"] = ir.AttrInt64("noop_with_empty_axes", 0)
