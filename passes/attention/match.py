"""Locate, for one analysed attention core, what a fused attention node needs.

The analysis map gives the core's anchors (scores MatMul, Softmax, context MatMul)
and geometry. From these anchors this module walks the few steps that separate the
core from its operands, tracking which tensor axis means what:

* Q / K / V: up from the MatMul operands through scalar scaling, Transpose, the
  repeat-KV ``Unsqueeze -> Expand -> Reshape`` and the KV-cache ``Concat``, stopping
  at the first op that computes something (rotary, a Split of a packed projection)
  or at the head-split Reshape of the projection output. What stops the walk is the
  post-rotary tensor the fused op must read, with its axis labels;
* the scale: every scalar factor the walk crossed (the fused op re-applies it once);
* the mask: the additive terms and ``Where`` conditions between scores and Softmax;
* the output: the ``[B, S, H*D]`` value that the head merge after the context MatMul
  produces (the fused op's output replaces it).

Anything not understood makes :func:`match_site` return a reason string instead of
a site, so the pass skips that layer and says why rather than guessing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxpress.analysis import Attention
from onnxpress.analysis.graph_utils import (
    _attr,
    const_array,
    const_scalar,
    consumers,
    data_consumers,
    is_constant,
    producer,
    shape_elements,
    walk_up,
)

# Axis labels: B batch, H heads, S positions (queries or keys), D head dim; "BSX" is packed [B, S, H*D].
PACKED = "BSX"
_DTYPE_INTS = frozenset({ir.DataType.INT64, ir.DataType.INT32, ir.DataType.BOOL, ir.DataType.UINT8})
_SHAPE_ARITHMETIC = frozenset({"Shape", "Slice", "Gather", "Cast", "Sqrt", "Div", "Mul", "Reciprocal", "Pow",
                               "Constant", "Squeeze", "Unsqueeze", "Reshape", "Identity"})


@dataclass
class Operand:
    """Where the walk from a Q/K/V MatMul operand stopped."""

    value: ir.Value
    axes: str  # labels of ``value``'s axes, e.g. "BHSD", "BSHD", or PACKED
    factors: list[float] = field(default_factory=list)  # constant scalar multipliers crossed
    dynamic: int = 0  # shape-derived multipliers crossed (SDPA's sqrt(1/sqrt(D)))
    past: ir.Value | None = None  # KV cache graph input concatenated in front
    present: ir.Value | None = None  # the Concat output holding past + new (BHSD)
    repeated: bool = False  # crossed a repeat-KV expansion
    # every value crossed: (value, its axis labels, heads on its H axis, includes the past positions)
    trail: list[tuple[ir.Value, str, int, bool]] = field(default_factory=list)


@dataclass
class MaskTerm:
    """One additive term (or Where condition) between the scores and the Softmax."""

    value: ir.Value
    condition: bool  # True: a bool ``Where`` condition (keep where true) with fill ``fill``
    fill: float = 0.0
    padding_source: ir.Value | None = None  # the 2-D [B, S_total] graph input it is built from
    pure: bool = True  # built only from that input, shapes and small constants (padding/causal)


@dataclass
class Site:
    """Everything needed to substitute one attention core."""

    att: Attention
    q: Operand
    k: Operand
    v: Operand
    scale: float
    terms: list[MaskTerm]
    merged: ir.Value | None  # [B, S, H*D] value after the head merge (None: rebuild BHSD instead)
    context_out: ir.Value  # the context MatMul output [B, H, S, D]
    anchor: ir.Node  # fused nodes go right after this node

    @property
    def past_key(self) -> ir.Value | None:
        return self.k.past

    @property
    def past_value(self) -> ir.Value | None:
        return self.v.past


def _perm(node: ir.Node) -> list[int] | None:
    perm = _attr(node, "perm", None)
    return list(perm) if perm is not None else None


def _repeat_source(reshape: ir.Node) -> ir.Value | None:
    """Input of ``Unsqueeze(axis 2) -> Expand -> Reshape`` (repeat_kv), else None."""
    expand = producer(reshape.inputs[0])
    if expand is None or expand.op_type != "Expand":
        return None
    unsq = producer(expand.inputs[0])
    if unsq is None or unsq.op_type != "Unsqueeze":
        return None
    axes = const_array(unsq.inputs[1]) if len(unsq.inputs) > 1 else None
    axes = axes if axes is not None else _attr(unsq, "axes", None)
    if axes is None or [int(a) for a in np.asarray(axes).reshape(-1)] not in ([2], [-3]):
        return None
    return unsq.inputs[0]


def _head_split_input(reshape: ir.Node, axes: str, heads: int, head_size: int) -> ir.Value | None:
    """The [B, S, H*D] input of a head-split Reshape to [B, S, H, D], else None.

    The input must be known to be 3-D: from its static shape, or because it is the
    output of a MatMul projection (a MatMul keeps the [B, S] leading dims; a Gemm
    would have flattened them)."""
    if axes != "BSHD":
        return None
    dims = shape_elements(reshape.inputs[1])
    src = reshape.inputs[0]
    if dims is None or len(dims) != 4 or dims[3] != head_size or dims[2] not in (heads, -1, None):
        return None
    if src.shape is not None:
        ok = len(src.shape) == 3 and (not isinstance(src.shape[2], int) or src.shape[2] == heads * head_size)
        return src if ok else None
    node = producer(src)
    if node is not None and node.op_type == "Add":  # bias after the projection MatMul
        node = next((producer(v) for v in node.inputs if not is_constant(v)), None)
    return src if node is not None and node.op_type == "MatMul" else None


def walk_operand(start: ir.Value, axes: str, heads: int, head_size: int, *, scalable: bool,
                 start_heads: int | None = None) -> Operand:
    """Walk from a scores/context MatMul operand up to the tensor a fused op reads.
    ``heads``: heads of the projection; ``start_heads``: heads at ``start`` (the query
    heads, when K/V were repeated for grouped-query attention)."""
    op = Operand(start, axes)
    value = start
    now_heads = start_heads or heads
    for _ in range(64):
        op.trail.append((value, axes, now_heads, False))
        node = producer(value)
        if node is None or node.domain not in ("", "ai.onnx"):
            break
        kind = node.op_type
        if kind in ("Mul", "Div") and scalable:
            a, b = node.inputs[0], node.inputs[1]
            c = const_scalar(b)
            if c is not None and c != 0:
                op.factors.append(c if kind == "Mul" else 1.0 / c)
                value = a
                continue
            c = const_scalar(a) if kind == "Mul" else None
            if c is not None:
                op.factors.append(c)
                value = b
                continue
            if kind == "Mul" and b is not None and _is_dynamic_scalar(b) and not _is_dynamic_scalar(a):
                op.dynamic += 1
                value = a
                continue
            break
        if kind == "Transpose":
            perm = _perm(node)
            if perm is None or len(perm) != len(axes):
                break
            new = [""] * len(perm)
            for i, p in enumerate(perm):
                new[p] = axes[i]
            axes, value = "".join(new), node.inputs[0]
            continue
        if kind == "Reshape":
            src = _repeat_source(node) if axes[1] == "H" else None
            if src is not None:
                op.repeated, value, now_heads = True, src, heads
                op.trail.append((node.inputs[0], "", 0, False))  # the 5-D Expand output: no surrogate
                continue
            packed = _head_split_input(node, axes, heads, head_size)
            if packed is not None:
                axes, value = PACKED, packed
            break
        if kind == "Concat" and op.past is None and len(node.inputs) == 2 and axes == "BHSD":
            axis = int(_attr(node, "axis", 0))
            past, new = node.inputs
            if axis in (2, -2) and past is not None and past.is_graph_input():
                op.past, op.present, value = past, node.outputs[0], new
                continue
            break
        if kind in ("Identity",):
            value = node.inputs[0]
            continue
        break
    op.value, op.axes = value, axes
    if op.past is not None:  # values above the cache Concat hold past + new positions
        cut = next(i for i, t in enumerate(op.trail) if t[0] is op.present)
        op.trail = [(v, a, n, i <= cut) for i, (v, a, n, _) in enumerate(op.trail)]
    return op


def _scores_chain(att: Attention) -> tuple[list[float], list[MaskTerm]] | str:
    """Scalar factors and mask terms between the scores MatMul and the Softmax.
    Scaling must happen before masking (else the mask itself is scaled)."""
    factors: list[float] = []
    terms: list[MaskTerm] = []
    scaled_after_mask = False  # the walk goes up: a factor seen before any term is applied after it
    value = att.softmax.inputs[0]
    for _ in range(16):
        node = producer(value)
        if node is att.scores_matmul:
            if scaled_after_mask and terms:
                return "the scores are scaled after the mask is added"
            return factors, terms
        if node is None or node.domain not in ("", "ai.onnx"):
            return "unexpected op between scores and Softmax"
        kind, ins = node.op_type, node.inputs
        if kind in ("Mul", "Div"):
            c = const_scalar(ins[1])
            if c is None:
                return f"non-constant scaling ({kind}) of the scores"
            scaled_after_mask = scaled_after_mask or not terms
            factors.append(c if kind == "Mul" else 1.0 / c)
            value = ins[0]
        elif kind == "Add":
            # the operand that leads to the scores MatMul continues the chain
            i = 0 if _reaches(ins[0], att.scores_matmul) else 1
            terms.append(MaskTerm(ins[1 - i], condition=False))
            value = ins[i]
        elif kind == "Where":
            if not is_constant(ins[2]) or const_scalar(ins[2]) is None:
                return "Where mask whose fill is not a constant scalar"
            terms.append(MaskTerm(ins[0], condition=True, fill=const_scalar(ins[2])))
            value = ins[1]
        elif kind in ("Identity", "Cast"):
            value = ins[0]
        else:
            return f"unexpected {kind} between scores and Softmax"
    return "scores chain too long"


def _reaches(value: ir.Value, target: ir.Node, limit: int = 16) -> bool:
    for _ in range(limit):
        node = producer(value)
        if node is None:
            return False
        if node is target:
            return True
        value = node.inputs[0]
    return False


def _classify(term: MaskTerm) -> None:
    """Is the term a padding/causal mask built from one 2-D graph input (what a key-padding
    mask plus the causal flag can express), or something else (a learned bias, ALiBi)?
    Inputs read only through ``Shape`` (input_ids sizing the mask) do not count."""
    nodes: list[ir.Node] = []

    def through(node: ir.Node):
        nodes.append(node)
        return None if node.op_type == "Shape" else node.inputs  # sizes only: not the mask's data

    for _ in walk_up(term.value, through, limit=5000):
        pass
    read: list[ir.Value] = []
    for node in nodes:
        for v in node.inputs:
            if v is None:
                continue
            if node.op_type == "Shape":
                continue
            if v.is_graph_input():
                if v not in read:
                    read.append(v)
            elif v.const_value is not None and v.const_value.dtype.is_floating_point() and v.const_value.size > 1:
                term.pure = False  # a float table (position bias, slopes): not a mask
        if node.op_type == "Constant":
            arr = const_array(node.outputs[0])
            if arr is not None and np.issubdtype(arr.dtype, np.floating) and arr.size > 1:
                term.pure = False
    masks = [v for v in read if v.shape is not None and len(v.shape) == 2 and v.dtype in _DTYPE_INTS]
    if len(masks) == 1:
        term.padding_source = masks[0]
    if len(read) != len(masks) or len(masks) > 1:
        term.pure = False


def _is_dynamic_scalar(value: ir.Value) -> bool:
    """A scalar computed from a Shape through Sqrt (SDPA's split 1/sqrt(head_size)), and
    from nothing but shape arithmetic."""
    ops: set[str] = set()

    def through(node: ir.Node):
        ops.add(node.op_type)
        return None if node.op_type == "Shape" else node.inputs

    for _ in walk_up(value, through, limit=32):
        pass
    return "Shape" in ops and "Sqrt" in ops and ops <= _SHAPE_ARITHMETIC


def _merged_output(context: ir.Node, heads: int, head_size: int) -> ir.Value | None:
    """``Transpose(0,2,1,3) -> Reshape([B, S, H*D])`` after the context MatMul."""
    users = data_consumers(context.outputs[0])
    if len(users) != 1 or users[0].op_type != "Transpose" or _perm(users[0]) != [0, 2, 1, 3]:
        return None
    users = data_consumers(users[0].outputs[0])
    if len(users) != 1 or users[0].op_type != "Reshape":
        return None
    dims = shape_elements(users[0].inputs[1])
    if dims is None or len(dims) != 3 or dims[2] not in (heads * head_size, -1, None):
        return None
    return users[0].outputs[0]


def match_site(att: Attention) -> Site | str:
    """A :class:`Site` for a decomposed attention core, or why it cannot be substituted."""
    if att.kind != "decomposed":
        return f"already fused ({att.kind})"
    if att.scores_matmul is None or att.context_matmul is None or att.softmax is None:
        return "no scores/context MatMul in the map"
    if att.scores_matmul.op_type != "MatMul" or _attr(att.softmax, "axis", -1) not in (-1, 3):
        return "scores are not a plain MatMul + last-axis Softmax"
    h, hkv, d = att.num_heads, att.num_kv_heads, att.head_size
    q = walk_operand(att.scores_matmul.inputs[0], "BHSD", h, d, scalable=True)
    k = walk_operand(att.scores_matmul.inputs[1], "BHDS", hkv, d, scalable=True, start_heads=h)
    v = walk_operand(att.context_matmul.inputs[1], "BHSD", hkv, d, scalable=False, start_heads=h)
    for name, op in (("Q", q), ("K", k), ("V", v)):
        if sorted(op.axes) != sorted("BHSD") and op.axes != PACKED:
            return f"{name} operand has an unexpected layout ({op.axes})"
    if q.past is not None or (k.past is None) != (v.past is None):
        return "KV cache only on one of K and V"
    if k.repeated != v.repeated or (hkv != h and not k.repeated):
        return "grouped-query heads without a recognisable repeat-KV expansion"
    chain = _scores_chain(att)
    if isinstance(chain, str):
        return chain
    factors, terms = chain
    dynamic = q.dynamic + k.dynamic
    if dynamic not in (0, 2):
        return "a shape-derived scale on only one of Q and K"
    scale = float(np.prod(factors + q.factors + k.factors)) if factors + q.factors + k.factors else 1.0
    if dynamic:
        scale /= math.sqrt(d)
    for term in terms:
        _classify(term)
    merged = _merged_output(att.context_matmul, h, d)
    return Site(att, q, k, v, scale, terms, merged, att.context_matmul.outputs[0], att.context_matmul)


def consumers_outside(value: ir.Value, nodes: set[int]) -> list[ir.Node]:
    return [n for n in consumers(value) if id(n) not in nodes]
