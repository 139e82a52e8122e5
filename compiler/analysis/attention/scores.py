"""The scores of a decomposed attention core, and the scale applied to them.

From the Softmax a walk goes down (through mask ``Add``/``Where`` and scaling ``Mul``/
``Div``) to the MatMul of two activations, ``q @ k^T``, and from the Softmax up (through
``Cast`` / NaN guards) to the context MatMul ``p @ v``. The ops between scores and Softmax
are read once into scale factors and mask terms, plus a sentence when they are not
``scale * scores + terms`` (what a fused attention op computes).

:func:`scalar_factor` is the one reading of "this Mul/Div scales its input by a scalar",
for the scores chain and for the Q/K paths alike; :func:`combined_scale` turns factors
into one number.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxpress.analysis.graph_utils import const_scalar, consumers, is_constant, producer, walk_up
from onnxpress.analysis.structures import MaskTerm, ScaleFactor

# Ops crossed between the Softmax and the scores MatMul.
_SCORE_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Cast", "Identity", "Reshape", "Max", "Min",
                        "Clip", "Squeeze", "Unsqueeze"})
# Ops crossed between the Softmax and the context MatMul.
_PROB_OPS = frozenset({"Cast", "Identity", "Dropout", "Where", "Reshape", "Squeeze", "Unsqueeze"})
# Ops a scalar computed from tensor sizes is made of.
_SHAPE_ARITHMETIC = frozenset({"Shape", "Slice", "Gather", "Cast", "Sqrt", "Div", "Mul", "Reciprocal", "Pow",
                               "Constant", "Squeeze", "Unsqueeze", "Reshape", "Identity"})
_MAX_CHAIN = 16


@dataclass
class ScoresChain:
    """The ops between the scores MatMul and the Softmax."""

    matmul: ir.Node
    nodes: list[ir.Node]  # crossed, nearest the Softmax first
    factors: list[ScaleFactor]  # nearest the Softmax first
    terms: list[MaskTerm]  # nearest the Softmax first
    problem: str | None  # why the chain is not ``scale * scores + terms``


def scalar_factor(node: ir.Node) -> tuple[int, float | None] | None:
    """``(input index, factor)`` when the Mul/Div ``node`` multiplies that input by a scalar:
    a constant, or (factor None) a scalar computed from shapes through a Sqrt, as SDPA
    exports spread ``1/sqrt(head_size)`` as ``sqrt(1/sqrt(D))`` over Q and K."""
    if node.op_type not in ("Mul", "Div") or len(node.inputs) < 2:
        return None
    a, b = node.inputs[0], node.inputs[1]
    c = const_scalar(b)
    if node.op_type == "Div":
        return (0, 1.0 / c) if c is not None and c != 0 else None
    if c is not None:
        return 0, c
    c = const_scalar(a)
    if c is not None:
        return 1, c
    if b is not None and is_dynamic_scalar(b) and not is_dynamic_scalar(a):
        return 0, None
    if a is not None and is_dynamic_scalar(a) and not is_dynamic_scalar(b):
        return 1, None
    return None


def is_dynamic_scalar(value: ir.Value | None) -> bool:
    """A scalar computed from a Shape through Sqrt, and from nothing but shape arithmetic."""
    if value is None:
        return False
    ops: set[str] = set()

    def through(node: ir.Node):
        ops.add(node.op_type)
        return None if node.op_type == "Shape" else node.inputs

    for _ in walk_up(value, through, limit=32):
        pass
    return "Shape" in ops and "Sqrt" in ops and ops <= _SHAPE_ARITHMETIC


def combined_scale(factors: list[ScaleFactor], head_size: int) -> float:
    """The product of the constant factors; computed ones stand for ``1/sqrt(head_size)``
    (SDPA's default scale), applied once."""
    constants = [f.value for f in factors if f.value is not None]
    scale = float(np.prod(constants)) if constants else 1.0
    if any(f.value is None for f in factors):
        scale /= math.sqrt(head_size)
    return scale


def is_scores_matmul(node: ir.Node) -> bool:
    if (
        node.op_type == "MatMul"
        and node.domain in ("", "ai.onnx")
        or (node.op_type == "FusedMatMul" and node.domain == "com.microsoft")
    ):
        return all(v is not None and not is_constant(v) for v in node.inputs[:2])
    return False


def find_scores(value: ir.Value) -> ScoresChain | None:
    """The chain from the Softmax input ``value`` down to the scores MatMul, None when no
    MatMul of two activations is reached."""
    found = _descend(value, 0)
    if found is None:
        return None
    matmul, steps = found
    return _read_chain(matmul, steps[::-1])


def _descend(value: ir.Value, depth: int) -> tuple[ir.Node, list[tuple[ir.Node, int]]] | None:
    """(the scores MatMul, [(node, index of the input that leads to it)] nearest the MatMul
    first): depth-first through the operands that are not constant."""
    node = producer(value)
    if node is None or depth > _MAX_CHAIN:
        return None
    if is_scores_matmul(node):
        return node, []
    if node.op_type not in _SCORE_OPS or node.domain not in ("", "ai.onnx"):
        return None
    op = node.op_type
    candidates = (0, 1) if op in ("Mul", "Div", "Add", "Sub") else (1, 2) if op == "Where" else (0,)
    for i in candidates:
        v = node.inputs[i] if i < len(node.inputs) else None
        if v is None or is_constant(v):
            continue
        found = _descend(v, depth + 1)
        if found is not None:
            found[1].append((node, i))
            return found
    return None


def _read_chain(matmul: ir.Node, steps: list[tuple[ir.Node, int]]) -> ScoresChain:
    """Factors, terms and the first problem, walking from the Softmax down to the MatMul."""
    factors: list[ScaleFactor] = []
    terms: list[MaskTerm] = []
    problem: str | None = None
    scaled_after_mask = False  # a factor met before any term is applied after the terms
    for node, i in steps:
        kind, ins = node.op_type, node.inputs
        if kind in ("Mul", "Div"):
            found = scalar_factor(node)
            value = found[1] if found is not None and found[0] == i else None
            factors.append(ScaleFactor(node, value, "scores", walked=True))
            if value is None:
                problem = problem or f"non-constant scaling ({kind}) of the scores"
            scaled_after_mask = scaled_after_mask or not terms
        elif kind in ("Add", "Sub"):
            terms.append(MaskTerm(ins[1 - i], node))
            if kind == "Sub":
                problem = problem or "unexpected Sub between scores and Softmax"
        elif kind == "Where":
            fill = const_scalar(ins[2]) if i == 1 else None
            terms.append(MaskTerm(ins[0], node, condition=True, fill=fill))
            if fill is None:
                problem = problem or "Where mask whose fill is not a constant scalar"
        elif kind not in ("Identity", "Cast"):
            problem = problem or f"unexpected {kind} between scores and Softmax"
    if matmul.op_type == "FusedMatMul":
        factors.append(ScaleFactor(matmul, matmul.attributes.get_float("alpha", 1.0), "scores", walked=True))
    if problem is None and scaled_after_mask and terms:
        problem = "the scores are scaled after the mask is added"
    return ScoresChain(matmul, [n for n, _ in steps], factors, terms, problem)


def find_context(softmax: ir.Node) -> ir.Node | None:
    """The MatMul that applies the probabilities to V."""
    queue = deque([softmax.outputs[0]])
    seen: set[int] = set()
    while queue:
        value = queue.popleft()
        for node in consumers(value):
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type == "MatMul" and node.inputs[0] is value and not is_constant(node.inputs[1]):
                return node
            if node.op_type == "IsNaN":
                continue
            if node.op_type in _PROB_OPS and (node.op_type != "Where" or value is not node.inputs[0]):
                queue.extend(node.outputs)
    return None
