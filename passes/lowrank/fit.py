"""Fitting the low-rank factors: ranks for a parameter budget, and each matrix's factors
fitted (one-shot, or sequentially on the inputs of the model compressed so far) and
written into the graph.

The numerics of one matrix (whitened SVD, truncation energies, rank allocation) are in
:mod:`onnxpress.factorization`; the statistics come from :mod:`onnxpress.activations`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxpress import factorization as fz
from onnxpress.activations import Gram, SegmentStream, token_rows, value_types
from onnxpress.analysis.matrices import Matrix, residual_add
from onnxpress.editing import GraphEditor, split_matrix


@dataclass
class ResidualStats:
    """What a matrix's output is added to (the residual stream at a residual Add): its upstream
    error D = R - R' (original minus compressed) against the inputs, so the split matrix can
    also cancel the part of that error its inputs predict."""

    cross: np.ndarray  # X'^T D
    cross_ref: np.ndarray  # X^T D
    total: np.ndarray  # sum of D rows
    sq: float = 0.0  # ||D||^2

    @classmethod
    def zeros(cls, d_in: int, d_out: int) -> ResidualStats:
        return cls(np.zeros((d_in, d_out)), np.zeros((d_in, d_out)), np.zeros(d_out))

    def add(self, x, x_ref, r, r_ref, mask) -> None:
        rows, ref_rows = token_rows(x, mask).astype(np.float32), token_rows(x_ref, mask).astype(np.float32)
        diff = token_rows(r_ref, mask).astype(np.float32) - token_rows(r, mask).astype(np.float32)
        self.cross += rows.T @ diff
        self.cross_ref += ref_rows.T @ diff
        self.total += diff.sum(0, dtype=np.float64)
        self.sq += float(np.sum(diff.astype(np.float64) ** 2))


def residual_of(m: Matrix) -> ir.Value | None:
    """The residual stream m's output (after its bias) is added to, when that Add reads the
    output itself: attention O and FFN down projections."""
    join = residual_add((m.bias_node or m.node).outputs[0], depth=1)
    return None if join is None else join.stream


def plan_ranks(matrices: list[Matrix], stats: dict[str, Gram], cfg,
               budget: float | None = None) -> list[int | None]:
    """One rank per matrix (None: keep it whole) saving ``budget`` parameters (default:
    ``fraction`` of the matrices' size).

    Both targets count the same thing here: a split layer costs r * (d_in + d_out)
    parameters and as many MACs per token (every selected matrix runs once per token),
    so ``params`` and ``macs`` budgets pick the same ranks.
    """
    total = sum(m.d_in * m.d_out for m in matrices)
    budget = cfg.fraction * total if budget is None else budget
    if cfg.allocation == "uniform":
        return fz.uniform_ranks([fz.Candidate(m.d_in, m.d_out, np.zeros(1)) for m in matrices], budget / total)
    candidates = []
    for m in matrices:
        gram = stats[m.input.name].xtx if cfg.method == "whitened" else None
        candidates.append(fz.Candidate(m.d_in, m.d_out, fz.decompose(m.weight, gram, eps=cfg.eps).energy))
    return fz.global_ranks(candidates, budget)


def fit_and_split(graph: ir.Graph | GraphEditor, m: Matrix, rank: int, s: Gram | None, cfg,
                   res: ResidualStats | None = None) -> float:
    """Factorise m at ``rank`` and rewrite it (``graph`` may be an editor of it, kept across
    the matrices); returns the relative output error on the calibration data
    (||X'AB - XW|| / ||XW||, bias correction included; with ``res``, the error of the
    residual sum X'AB + R' against XW + R, still relative to ||XW||)."""
    whitened = cfg.method == "whitened" and s is not None
    # the cross term only matters once X' differs from X (sequential fitting after the first group)
    cross = s.cross if whitened and s.has_reference else None
    res = res if whitened and cross is not None else None
    # prior in pseudo-tokens per input dimension: lambda = refit_prior * mean ||x'||^2 per token
    prior = cfg.refit_prior * float(np.trace(s.xtx)) / max(s.count, 1) if cross is not None else 0.0
    dec = fz.decompose(m.weight, s.xtx if whitened else None, cross=cross, eps=cfg.eps,
                        residual=res.cross if res is not None else None, prior=prior)
    a, b = dec.factors(rank)
    w_r = a @ b
    bias = m.bias
    if cfg.bias_correction and s is not None:
        shift = fz.bias_shift(m.weight, w_r, s.mean_ref, s.mean)
        if res is not None:
            shift = shift + res.total / max(s.count, 1)
        bias = shift if bias is None else bias + shift
    split_matrix(graph, m, a, b, bias)
    if s is None:
        return float(np.linalg.norm(m.weight - w_r) / max(np.linalg.norm(m.weight), 1e-30))
    return fz.output_error(m, w_r, s, bias, res)


def fit_sequential(model, chosen, batches, cfg, threads) -> tuple[dict[str, float], int]:
    """Fit group after group (matrices sharing an input, in graph order), each on the
    inputs of the model as compressed so far, towards the original outputs; returns the
    fit errors by matrix key and the number of calibration tokens."""
    reference = model.clone()  # frozen copy of the uncompressed model
    ref_node = {id(a): b for a, b in zip(model.graph, reference.graph, strict=True)}  # same order
    order = {id(node): i for i, node in enumerate(model.graph)}
    groups: dict[str, list[tuple[Matrix, int]]] = defaultdict(list)
    for m, r in chosen:
        groups[m.input.name].append((m, r))
    firsts = {name: min((m.node for m, _ in g), key=lambda n: order[id(n)]) for name, g in groups.items()}
    names = sorted(groups, key=lambda n: order[id(firsts[n])])
    types = value_types(model)
    stream, ref_stream = SegmentStream(model, batches, types, threads), SegmentStream(reference, batches, types, threads)
    editor = GraphEditor(model)
    errors = {}
    for i, name in enumerate(names):
        first = firsts[name]
        residuals = {}  # residual value name by matrix key: only those computed before the group
        if cfg.residual_correction and i > 0:
            for m, _ in groups[name]:
                res = residual_of(m)
                producer = res.producer() if res is not None else None
                if producer is not None and order.get(id(producer), len(order)) < order[id(first)]:
                    residuals[m.key] = res.name
        wanted = [name, *sorted(set(residuals.values()))]
        xs = stream.advance(first, wanted)
        xs_ref = ref_stream.advance(ref_node[id(first)], wanted)
        mask = [feeds.get("attention_mask") for feeds in batches]
        s = Gram(products=np.float32)
        for x, x_ref, k in zip(xs, xs_ref, mask, strict=True):
            # nothing upstream is compressed before the first group: its inputs are the original ones
            s.add(token_rows(x[0], k), token_rows(x_ref[0], k) if i > 0 else None)
        for m, r in groups[name]:
            res_stats = None
            if m.key in residuals:
                j = wanted.index(residuals[m.key])
                res_stats = ResidualStats.zeros(m.d_in, m.d_out)
                for x, x_ref, k in zip(xs, xs_ref, mask, strict=True):
                    res_stats.add(x[0], x_ref[0], x[j], x_ref[j], k)
            errors[m.key] = fit_and_split(editor, m, r, s, cfg, res_stats)
    return errors, s.count
