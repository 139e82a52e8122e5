"""Decomposed attention, anchored on each ``Softmax``.

Walking down from the Softmax must reach a MatMul of two activations (the scores,
``q @ k^T``); walking up must reach the context MatMul (``p @ v``). From the three
operands the walk goes up to the nearest constant-weight projections, and from the
context MatMul down to the output projection. No node names or fixed parent paths are
used, so torch.onnx (TorchScript and dynamo), optimum and hand-written graphs match
alike. Besides the geometry, the match records what a fused op replacing the core needs:
the Q/K/V tensors it reads, the scale it applies and the mask terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnxpress.analysis.attention.heads import HeadGeometry, head_geometry
from onnxpress.analysis.attention.masks import mask_is_causal
from onnxpress.analysis.attention.operands import walk_operand
from onnxpress.analysis.attention.paths import (
    Trace,
    find_output_projection,
    first_past,
    is_rotary,
    path_nodes,
    present,
    trace_up,
)
from onnxpress.analysis.attention.scores import (
    ScoresChain,
    combined_scale,
    find_context,
    find_scores,
    scalar_factor,
)
from onnxpress.analysis.structures import Attention, Linear, MaskTerm, OperandPath, ScaleFactor

if TYPE_CHECKING:
    from onnxpress.analysis.attention import AttentionFinder


@dataclass
class _Core:
    """The anchors of a decomposed core and the projections its operands lead to."""

    softmax: ir.Node
    scores: ScoresChain
    context: ir.Node  # p @ v
    q_trace: Trace
    k_trace: Trace
    v_trace: Trace
    q: Linear  # q, k and v are one Linear for a packed QKV projection
    k: Linear
    v: Linear
    o: Linear | None


def match_decomposed(finder: AttentionFinder, softmax: ir.Node) -> Attention | None:
    """The attention block around ``softmax``, or None (with a note when it looked like one)."""
    where = f"Softmax {softmax.name or '?'}"
    core = _find_core(finder, softmax, where)
    if core is None:
        return None
    q_nodes, k_nodes = path_nodes(core.q_trace, core.q), path_nodes(core.k_trace, core.k)
    factors = core.scores.factors + _path_factors(q_nodes, "q") + _path_factors(k_nodes, "k")
    product, scale_source = _constant_scale(factors)
    geometry = head_geometry(core.q, core.k, q_nodes, k_nodes, core.scores.matmul.inputs[0], product,
                             scale_source, finder.notes, where)
    if geometry is None:
        return None
    paths, factors = _operand_paths(core.scores, core.context, geometry, factors)
    for term in core.scores.terms:
        term.padding_source, term.pure = finder.padding_source(term.value)
    att = _record(core, geometry, scale_source, factors, paths)
    finder.finish(att, finder.core([core.q, core.k, core.v], core.o, core.context))
    return att


def _find_core(finder: AttentionFinder, softmax: ir.Node, where: str) -> _Core | None:
    """Scores and context MatMuls around ``softmax`` and the projections around them."""
    notes, index = finder.notes, finder.index
    scores = find_scores(softmax.inputs[0])
    if scores is None:
        notes.append(f"{where}: not attention (no q@k MatMul of two activations feeds it)")
        return None
    context = find_context(softmax)
    if context is None:
        notes.append(f"{where}: scores found but no probabilities@V MatMul after it")
        return None
    operands = (scores.matmul.inputs[0], scores.matmul.inputs[1], context.inputs[1])
    traces = [trace_up(v, index) for v in operands]
    projections = [tr.linear for tr in traces]
    if any(lin is None for lin in projections):
        missing = [n for n, lin in zip("QKV", projections, strict=True) if lin is None]
        notes.append(f"{where}: attention-like, but no constant-weight {'/'.join(missing)} projection found")
        return None
    for name, tr in zip("QKV", traces, strict=True):
        if len(tr.linears) > 1:
            notes.append(
                f"{where}: {len(tr.linears)} projections reach the {name} operand; using {tr.linear.name}"
            )
    o = find_output_projection(context.outputs[0], index)
    if o is None:
        notes.append(f"{where}: no output projection after the context MatMul")
    return _Core(softmax, scores, context, *traces, *projections, o)


def _record(core: _Core, g: HeadGeometry, scale_source: str, factors: list[ScaleFactor],
            paths: tuple[OperandPath, ...]) -> Attention:
    packed = core.q is core.k or core.q is core.v
    terms = core.scores.terms
    problem = _scores_problem(core.scores, factors)
    return Attention(
        layer=-1,
        kind="decomposed",
        q=None if packed else core.q,
        k=None if packed else core.k,
        v=None if packed else core.v,
        qkv=core.q if packed else None,
        o=core.o,
        num_heads=g.num_heads,
        num_kv_heads=g.num_kv_heads,
        head_size=g.head_size,
        scale=combined_scale(factors, g.head_size),
        causal=any(mask_is_causal(t.value) for t in terms),
        mask=_mask_of(terms),
        rotary=is_rotary(core.q_trace, core.q),
        softmax=core.softmax,
        scores_matmul=core.scores.matmul,
        context_matmul=core.context,
        past_key=first_past(core.k_trace),
        past_value=first_past(core.v_trace),
        present_key=present(core.k_trace),
        present_value=present(core.v_trace),
        scale_source=scale_source,
        qkv_layout=g.layout,
        scale_factors=factors,
        mask_terms=terms,
        q_path=paths[0],
        k_path=paths[1],
        v_path=paths[2],
        path_scale=None if problem else combined_scale([f for f in factors if f.walked], g.head_size),
        scores_problem=problem,
    )


def _path_factors(nodes: list[ir.Node], on: str) -> list[ScaleFactor]:
    """Scalar multipliers on the path from a projection to the scores."""
    out = []
    for node in nodes:
        found = scalar_factor(node)
        if found is not None:
            out.append(ScaleFactor(node, found[1], on, walked=False))
    return out


def _constant_scale(factors: list[ScaleFactor]) -> tuple[float, str]:
    """(product of the constant factors, scale source): "default" when a computed factor
    stands for 1/sqrt(head_size), "constant" when constants alone scale, else "none"."""
    constants = [f.value for f in factors if f.value is not None]
    product = float(np.prod(constants)) if constants else 1.0
    if any(f.value is None for f in factors):
        return product, "default"
    return product, "constant" if constants else "none"


def _operand_paths(scores: ScoresChain, context: ir.Node, g: HeadGeometry,
                   factors: list[ScaleFactor]) -> tuple[tuple[OperandPath, ...], list[ScaleFactor]]:
    """The Q/K/V tensors a fused op reads, and ``factors`` with those the Q/K walks crossed
    marked as walked (the scores factors first, then the walked ones, then the rest)."""
    q, q_factors = walk_operand(scores.matmul.inputs[0], "BHSD", g.num_heads, g.head_size, on="q")
    k, k_factors = walk_operand(scores.matmul.inputs[1], "BHDS", g.num_kv_heads, g.head_size, on="k",
                                start_heads=g.num_heads)
    v, _ = walk_operand(context.inputs[1], "BHSD", g.num_kv_heads, g.head_size, on=None,
                        start_heads=g.num_heads)
    walked = {id(f.node) for f in q_factors + k_factors}
    rest = [f for f in factors if f.on != "scores" and id(f.node) not in walked]
    return (q, k, v), scores.factors + q_factors + k_factors + rest


def _scores_problem(scores: ScoresChain, factors: list[ScaleFactor]) -> str | None:
    """Why the scores are not ``path_scale * (q_path @ k_path^T) + mask_terms``."""
    if scores.problem:
        return scores.problem
    computed = sum(1 for f in factors if f.walked and f.on != "scores" and f.value is None)
    if computed not in (0, 2):
        return "a shape-derived scale on only one of Q and K"
    return None


def _mask_of(terms: list[MaskTerm]) -> ir.Value | None:
    """The mask the scores nearest the MatMul get: an added tensor, else a Where condition."""
    nearest_first = terms[::-1]
    added = [t.value for t in nearest_first if not t.condition]
    conditions = [t.value for t in nearest_first if t.condition]
    return (added + conditions)[0] if added or conditions else None
