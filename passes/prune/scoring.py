"""Shared pieces of the structured-pruning passes (``prune_heads``, ``prune_ffn``).

Both passes remove *groups of input features* of one linear layer -- the attention
output projection (a group = the context columns of one head, or of one KV group of
heads) or the FFN down projection (a group = one intermediate neuron) -- together with
whatever produces those features upstream. Post-training, in the spirit of Kwon et
al. 2022 ("A Fast Post-Training Pruning Framework for Transformers"):

1. *Statistics*: stream the calibration data once and keep, per layer, the Gram
   matrix of the projection's input ``X`` augmented with a ones column
   (``[X 1]^T [X 1]``: X^T X, the column sums and the token count). The layer's
   original output is ``Y = X W + b``, so every least-squares quantity below follows
   from that Gram and the weights; no activation is ever held.
2. *Scoring*: per layer, a greedy backward elimination orders the groups by how much
   the layer's output error grows when each is removed -- with repair, the increase
   of the ridge least-squares reconstruction error (optimal brain surgeon updates of
   the inverse Gram), without, the energy ``||X_S W_S||^2`` of what was removed. The
   naive baseline orders by the weight norm of the projection's rows.
3. *Allocation across layers*: every layer's cumulative error curve, normalised by the
   energy of the residual stream the layer writes into (so errors in different
   layers are comparable), is made convex and the budget is spent across layers in
   order of error per unit of cost (heads / neurons, parameters or MACs) (``global``);
   or each layer is pruned alone at a few shares and the model's outputs measured on
   calibration sequences the fits did not see, and the budget is spent in order of
   measured loss per unit of cost (``probe``).
4. *Repair*: the projection's kept rows and bias are refitted by ridge least squares
   to reproduce the original output from the kept features (on every calibration
   sequence the pass uses, the probes' included).

Conventions: a linear layer computes ``Y = X @ W + b`` with ``W`` of shape
[d_in, d_out] (transposed storage is handled by the callers).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import onnx_ir as ir

from onnxpress.activations import Gram, capture_grams
from onnxpress.analysis.matrices import matrix_of, residual_add
from onnxpress.calibration import leading_batches, trim_padding
from onnxpress.errors import OnnxpressError
from onnxpress.factorization import allocate_measured
from onnxpress.fidelity import primary_outputs
from onnxpress.weight_probe import Prober, first_samples, units_of

if TYPE_CHECKING:
    from onnxpress.analysis import Layer, Linear

# Ridge added to the diagonal of X^T X, relative to its mean diagonal: keeps the normal
# equations well posed for dead features and few tokens while leaving the fit of the
# well-conditioned directions untouched. Never applied to the bias (ones) column.
DEFAULT_RIDGE = 1e-4


# ------------------------------------------------------------------------ statistics


class LayerStats(NamedTuple):
    """Step 1 for one layer's projection: the Gram of its input and the energy of the residual
    stream it writes into (0 when that was not found)."""

    gram: Gram
    residual_energy: float


def residual_output(linear: Linear, layer: Layer) -> ir.Value | None:
    """The residual stream right after ``linear``'s output is added to it: the value
    whose energy normalises this layer's errors (None when not found)."""
    join = residual_add(linear.output, layer.residual_adds)
    return None if join is None else join.add.outputs[0]


@dataclass
class CalibrationStats:
    """What a pass learns from the calibration: per layer, the statistics the elimination
    orders and the probes' trial refits are fitted on (``fit``), those the rewrite's refits use
    (``final``: ``fit`` plus the sequences set apart for the probes, when those came from the
    pass's own batches), and the sequences a probed allocation measures on (``probes``).
    The statistics are None when the config needs no data (weight-norm scores, no repair)."""

    fit: list[LayerStats] | None
    final: list[LayerStats] | None
    probes: list[dict]

    def repairs(self, cfg, weights: list, biases: list, *, final: bool) -> list:
        """Per layer, :func:`repair_of` on the fit statistics (the probes' trials) or on the final
        ones (the rewrite)."""
        stats = self.final if final else self.fit
        return [repair_of(cfg, stats[i] if stats else None, w, b)
                for i, (w, b) in enumerate(zip(weights, biases, strict=True))]


def calibration_stats(model: ir.Model, ctx, pass_name: str, cfg, kind: str,
                      projections: list[tuple[Linear, Layer]]) -> CalibrationStats:
    """The layers' statistics and the probe sequences, kept apart.

    Probes measured on the tokens the refits were fitted on flatter the layers a refit makes up
    for best: MiniLM's last layer with 3 of 12 heads pruned and its output projection refitted
    on 64 sequences lost 0.0004 pooled cosine on those and 0.034 on the compile's held-out
    sequences. A probed allocation therefore measures on the ``probe_samples`` sequences after
    the pass's first ``max_batches`` batches or, where it uses every batch, on its last
    sequences (at most a quarter), which only the final refits then add."""
    batches = ctx.calibration_batches(pass_name, augment=cfg.augment)
    used = leading_batches(batches, cfg.max_batches)
    fit, held, probes = used, [], []
    if allocation_for(cfg.allocation, kind) == "probe":
        if len(used) < len(batches):
            probes = batches[len(used):]
        elif len(used) > 1:
            sizes = np.cumsum([len(next(iter(b.values()))) for b in used[::-1]])
            n_held = min(len(used) - 1, int(np.searchsorted(sizes, min(cfg.probe_samples, max(1, sizes[-1] // 4)))) + 1)
            fit, held = used[:-n_held], used[-n_held:]
            probes = held
        else:
            probes = used  # a single batch: nothing to set apart
        probes = [trim_padding(f) for f in first_samples(probes, cfg.probe_samples)]
    if cfg.score != "contribution" and not cfg.repair:
        return CalibrationStats(None, None, probes)
    stats = _layer_stats(model, ctx, fit, projections)
    final = stats
    if held:
        final = [LayerStats(a.gram + b.gram, a.residual_energy + b.residual_energy)
                 for a, b in zip(stats, _layer_stats(model, ctx, held, projections), strict=True)]
    return CalibrationStats(stats, final, probes)


def _layer_stats(model: ir.Model, ctx, batches: list[dict], projections: list[tuple[Linear, Layer]]
                 ) -> list[LayerStats]:
    """One streaming pass over ``batches``: :class:`LayerStats` for the projection of every layer."""
    residuals = [residual_output(lin, layer) for lin, layer in projections]
    captured = capture_grams(model, batches, [lin.input.name for lin, _ in projections],
                             [r.name for r in residuals if r is not None], threads=ctx.threads)
    energy = [captured.energy.get(r.name, 0.0) if r is not None else 0.0 for r in residuals]
    return [LayerStats(captured.grams[lin.input.name], e) for (lin, _), e in zip(projections, energy, strict=True)]


def error_scale(stats: LayerStats, weight: np.ndarray, bias: np.ndarray | None) -> float:
    """What a layer's errors are divided by: the energy of its residual stream, or without one
    the layer's own output energy."""
    if stats.residual_energy > 0:
        return stats.residual_energy
    return output_energy(stats.gram, weight, bias)


def augment(weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """[W; b]: the (d_in+1) x d_out weight acting on [X 1]."""
    weight = np.asarray(weight, np.float64)
    b = np.zeros(weight.shape[1]) if bias is None else np.asarray(bias, np.float64).reshape(1, -1)
    return np.vstack([weight, b])


def output_energy(gram: Gram, weight: np.ndarray, bias: np.ndarray | None) -> float:
    """||X W + b||^2 over the calibration tokens, from the Gram alone."""
    w = augment(weight, bias)
    return float(np.einsum("ij,ij->", w, gram.matrix() @ w))


# ------------------------------------------------------------------ elimination order


@dataclass
class Elimination:
    """A layer's greedy removal path: ``order[k]`` is the k-th group removed and
    ``errors[k]`` the layer's output error (squared, summed over tokens) once the
    first k+1 groups are gone. ``errors`` is non-decreasing."""

    order: list[int]
    errors: np.ndarray


def _ridge_hessian(gram: Gram, ridge: float) -> np.ndarray:
    h = gram.matrix()
    d = gram.dim
    lam = ridge * max(float(np.mean(np.diag(gram.xtx))) if d else 0.0, 1e-12)
    h[np.arange(d), np.arange(d)] += lam
    # a calibration set with no tokens would leave the bias row empty
    h[d, d] = max(h[d, d], 1.0)
    return h


def _stable_inv(h: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive definite matrix from its Cholesky factor (LAPACK
    potrf/potri: half the work of a general inverse)."""
    from scipy.linalg import lapack

    jitter = 1e-10 * max(float(np.mean(np.diag(h))), 1e-12)
    for _ in range(8):  # a numerically indefinite Gram: grow the ridge until Cholesky succeeds
        c, info = lapack.dpotrf(h, lower=True)
        if info == 0:
            inv, info = lapack.dpotri(c, lower=True)
            if info == 0:
                inv = np.tril(inv) + np.tril(inv, -1).T
                return inv
        h = h + jitter * np.eye(len(h))
        jitter *= 100
    return np.linalg.pinv(h)


def eliminate_with_repair(
    gram: Gram,
    weight: np.ndarray,
    bias: np.ndarray | None,
    groups: list[np.ndarray],
    max_remove: int,
    *,
    ridge: float = DEFAULT_RIDGE,
    chunk: int = 1,
) -> Elimination:
    """Greedy backward elimination under least-squares repair (block OBS).

    With ``H`` the ridge-regularised Gram of [X 1], ``P = H^-1`` over the kept
    features and ``W`` the current least-squares solution, removing the feature set
    S and refitting the rest raises the error by ``tr(W_S^T (P_SS)^-1 W_S)`` and
    updates ``W -= P_:S P_SS^-1 W_S`` and ``P -= P_:S P_SS^-1 P_S:`` (exact, not an
    approximation). ``chunk`` > 1 removes that many of the cheapest single groups at
    once (for thousands of neurons); the recorded errors stay exact for the set.
    """
    h = _ridge_hessian(gram, ridge)
    p = _stable_inv(h)
    w = p @ (h @ augment(weight, bias))  # LS solution of the ridge problem (= [W; b] up to the ridge)
    remaining = list(range(len(groups)))
    order: list[int] = []
    errors: list[float] = []
    total = 0.0
    single = all(len(g) == 1 for g in groups)
    while len(order) < max_remove and remaining:
        if single:  # ||W_i||^2 / P_ii, vectorised
            idx = np.array([groups[g][0] for g in remaining])
            scores = (w[idx] ** 2).sum(1) / np.maximum(np.diag(p)[idx], 1e-300)
        else:
            scores = np.array([_block_cost(p, w, groups[g]) for g in remaining])
        take = min(chunk, max_remove - len(order), len(remaining))
        picked = [remaining[i] for i in np.argsort(scores, kind="stable")[:take]]
        s = np.concatenate([groups[g] for g in picked])
        total += _block_cost(p, w, s)
        p, w = _remove(p, w, s)
        for g in picked:
            remaining.remove(g)
            order.append(g)
            errors.append(total)  # within a chunk the set's error is shared by its members
    return Elimination(order, np.maximum.accumulate(np.asarray(errors, np.float64)) if errors else np.zeros(0))


def _block_cost(p: np.ndarray, w: np.ndarray, s: np.ndarray) -> float:
    pss = p[np.ix_(s, s)]
    ws = w[s]
    try:
        return float(np.einsum("ij,ij->", ws, np.linalg.solve(pss, ws)))
    except np.linalg.LinAlgError:
        return float(np.einsum("ij,ij->", ws, np.linalg.pinv(pss) @ ws))


def _remove(p: np.ndarray, w: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OBS update that drops features ``s``; their rows/columns become zero (kept in
    place so group indices stay valid)."""
    pss = p[np.ix_(s, s)]
    try:
        inv = np.linalg.inv(pss)
    except np.linalg.LinAlgError:
        inv = np.linalg.pinv(pss)
    ps = p[:, s]
    w -= ps @ (inv @ w[s])
    p -= ps @ (inv @ ps.T)  # in place: P is the big one (d+1 squared)
    p[s, :] = 0.0
    p[:, s] = 0.0
    w[s] = 0.0
    return p, w


def eliminate_without_repair(
    gram: Gram, weight: np.ndarray, groups: list[np.ndarray], max_remove: int
) -> Elimination:
    """Greedy elimination when nothing is refitted: removing the set S changes the
    output by ``X_S W_S``, so the error is ``tr(W_S^T G_SS W_S)``; the next group is
    the one that raises it least, cross terms with the already removed ones included."""
    w = np.asarray(weight, np.float64)
    g = gram.xtx
    removed_cols = np.zeros(g.shape[0], bool)
    remaining = list(range(len(groups)))
    order: list[int] = []
    errors: list[float] = []
    total = 0.0
    while len(order) < max_remove and remaining:
        # increment of adding group j: tr(W_j^T G_jj W_j) + 2 tr(W_j^T G_jS W_S)
        gs_ws = g[:, removed_cols] @ w[removed_cols] if removed_cols.any() else np.zeros_like(w)
        incs = []
        for j in remaining:
            cols = groups[j]
            own = float(np.einsum("ij,ij->", w[cols], g[np.ix_(cols, cols)] @ w[cols]))
            incs.append(own + 2.0 * float(np.einsum("ij,ij->", w[cols], gs_ws[cols])))
        best = int(np.argmin(incs))
        j = remaining.pop(best)
        total += incs[best]
        removed_cols[groups[j]] = True
        order.append(j)
        errors.append(max(total, 0.0))
    return Elimination(order, np.maximum.accumulate(np.asarray(errors, np.float64)) if errors else np.zeros(0))


def eliminate_by_weight_norm(weight: np.ndarray, groups: list[np.ndarray], max_remove: int) -> Elimination:
    """Naive baseline: smallest Frobenius norm of the group's projection rows first;
    the "errors" are the cumulative squared norms (no data involved)."""
    w = np.asarray(weight, np.float64)
    norms = np.array([float((w[g] ** 2).sum()) for g in groups])
    order = [int(i) for i in np.argsort(norms, kind="stable")[:max_remove]]
    return Elimination(order, np.cumsum(norms[order]))


# ---------------------------------------------------------------- global allocation


@dataclass
class LayerCurve:
    """One layer's candidate removals for the allocator: the elimination path, the cost
    saved by each removal (same unit as the budget) and the normaliser of its error."""

    elimination: Elimination
    unit_cost: float
    scale: float = 1.0  # errors are divided by this (the energy of the layer's residual stream)
    max_remove: int | None = None  # cap on removals (e.g. keep at least one head)

    def path(self) -> np.ndarray:
        n = len(self.elimination.order)
        if self.max_remove is not None:
            n = min(n, self.max_remove)
        return self.elimination.errors[:n] / (self.scale if self.scale > 0 else 1.0)


def allocate(curves: list[LayerCurve], budget: float) -> list[int]:
    """Removals per layer that save at least ``budget`` (as far as the caps allow) at
    the least total normalised error.

    Greedy on each layer's lower convex hull of (removals, error): a hull segment's
    slope is its error per unit cost, slopes rise along a layer's path, so taking
    segments in global slope order is the water-filling optimum for the convexified
    problem; inside the last segment single removals are taken until the budget is
    met. With ``budget <= 0`` nothing is removed.
    """
    counts = [0] * len(curves)
    if budget <= 0:
        return counts
    heap: list[tuple[float, int, int, int]] = []  # (slope, layer, seq, end of segment)
    segments = [_hull_segments(c.path()) for c in curves]
    for i, segs in enumerate(segments):
        if segs:
            end, slope = segs[0]
            heapq.heappush(heap, (slope / curves[i].unit_cost, i, 0, end))
    saved = 0.0
    while heap and saved < budget - 1e-9:
        _, i, seg, end = heapq.heappop(heap)
        while counts[i] < end and saved < budget - 1e-9:
            counts[i] += 1
            saved += curves[i].unit_cost
        if counts[i] == end and seg + 1 < len(segments[i]):
            nxt_end, slope = segments[i][seg + 1]
            heapq.heappush(heap, (slope / curves[i].unit_cost, i, seg + 1, nxt_end))
    return counts


def _hull_segments(errors: np.ndarray) -> list[tuple[int, float]]:
    """Lower convex hull of the points (k, errors[k-1]) with (0, 0) prepended, as
    (end count, slope per removal) segments with non-decreasing slopes."""
    pts = [(0, 0.0)] + [(k + 1, float(e)) for k, e in enumerate(errors)]
    hull: list[tuple[int, float]] = []
    for pt in pts:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            # drop the middle point when it lies on or above the chord
            if (y2 - y1) * (pt[0] - x1) >= (pt[1] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(pt)
    return [(x2, (y2 - y1) / (x2 - x1)) for (x1, y1), (x2, y2) in zip(hull, hull[1:], strict=False)]


def layer_counts(curves: list[LayerCurve], totals: list[int], fraction: float, allocation: str) -> list[int]:
    """Removals per layer for ``fraction`` of all the layers' groups (``totals`` each):
    allocated globally by cost, or the same share in every layer (``uniform``)."""
    if allocation == "global":
        grand_total = sum(c.unit_cost * n for c, n in zip(curves, totals, strict=True))
        return allocate(curves, fraction * grand_total)
    return uniform_counts(curves, fraction, totals)


# Measured allocation: each layer is pruned alone to these multiples of the average share and the
# model's outputs measured (the proxy above normalises each layer's own error by its residual
# stream, which does not say how much of it reaches the outputs)
PROBE_LEVELS = (0.5, 1.0, 2.0, 3.0)


def allocation_for(allocation: str, kind: str) -> str:
    """The allocation ``auto`` stands for on a model of ``kind``. Probing measured better on
    MiniLM (BBC News cosine, 25% of FFN neurons: 0.948 against 0.940 global; 33% of heads: 0.947
    against 0.932) but worse on SmolLM2 (25% of FFN neurons, BBC News perplexity +97% against
    +66% global, in 2.3x the time and twice the memory: its probes compare float64 copies of
    49,152-wide logits, a squared error that is not the perplexity), so decoders keep ``global``."""
    if allocation != "auto":
        return allocation
    return "global" if kind == "decoder" else "probe"


def allocated_counts(model: ir.Model, ctx, pass_name: str, cfg, kind: str, linears: list[Linear],
                     curves: list[LayerCurve], groups: list[list[np.ndarray]], repairs: list,
                     totals: list[int], probes: list[dict]) -> tuple[list[int], str, list[str]]:
    """Removals per layer for ``cfg.fraction`` of the groups under ``cfg.allocation`` on a model
    of ``kind``; ``linears[i]`` is layer i's projection whose input rows the groups are; a probed
    allocation measures on the sequences ``probes`` (:func:`calibration_stats`). Returns
    the counts, the allocation used and notes. ``auto`` falls back to ``global`` where a
    projection is not a float matrix the probe can substitute (:func:`matrix_of`)."""
    allocation, notes = allocation_for(cfg.allocation, kind), []
    if allocation == "probe":
        matrices = [matrix_of(lin, f"layer{i}.projection", i) for i, lin in enumerate(linears)]
        if all(m is not None for m in matrices):
            outputs = getattr(ctx, "output_names", None) or primary_outputs(model)
            prober = Prober(model, matrices, probes, outputs, ctx.threads)
            return probe_counts(prober, matrices, curves, groups, repairs, cfg.fraction, totals), allocation, notes
        if cfg.allocation == "probe":
            raise OnnxpressError(f"{pass_name}: allocation 'probe' needs float MatMul / Gemm projections; "
                                 "use allocation=global")
        allocation = "global"
        notes.append("allocation auto: a projection is not a float MatMul / Gemm the probe can replace; global")
    return layer_counts(curves, totals, cfg.fraction, allocation), allocation, notes


def probe_counts(prober, matrices: list, curves: list[LayerCurve], groups: list[list[np.ndarray]],
                 repairs: list, fraction: float, totals: list[int]) -> list[int]:
    """Removals per layer for ``fraction`` of all the layers' groups, allocated by the model's
    measured output loss (``prober.loss``).

    Each unit (a layer, or a bucket of consecutive layers when there are many:
    :func:`~onnxpress.weight_probe.units_of`) is pruned alone at PROBE_LEVELS times the average
    share: layer i loses the first groups of its elimination order, the kept rows repaired by
    ``repairs[i](keep_columns)`` -> (W, b) (:func:`repair_of`). The units' (cost saved, loss) points are shared out
    assuming losses add (:func:`~onnxpress.factorization.allocate_measured`), and every layer
    of a unit loses the unit's share."""
    caps = [len(c.path()) for c in curves]
    units = units_of(matrices)
    points = []
    for unit in units:
        unit_points = {}
        for level in PROBE_LEVELS:
            counts = {i: min(caps[i], int(round(level * fraction * totals[i]))) for i in unit}
            saved = sum(k * curves[i].unit_cost for i, k in counts.items())
            if saved > 0 and saved not in unit_points:
                trial = {i: _pruned_trial(matrices[i], curves[i], groups[i], repairs[i], k)
                         for i, k in counts.items() if k}
                unit_points[saved] = prober.loss(trial)
        points.append(sorted(unit_points.items()))
    budget = fraction * sum(c.unit_cost * n for c, n in zip(curves, totals, strict=True))
    shares = [0.0] * len(curves)
    for unit, saved in zip(units, allocate_measured(points, budget), strict=True):
        share = saved / sum(curves[i].unit_cost * totals[i] for i in unit)
        for i in unit:
            shares[i] = min(caps[i], share * totals[i])
    counts = [int(np.floor(s + 1e-9)) for s in shares]
    # the last hull segment is taken in part: round up the largest remainders until the budget is met
    for i in np.argsort([c - s for c, s in zip(counts, shares, strict=True)], kind="stable"):
        if sum(n * c.unit_cost for n, c in zip(counts, curves, strict=True)) >= budget - 1e-9:
            break
        if counts[i] < caps[i] and shares[i] > counts[i]:
            counts[i] += 1
    return counts


def _pruned_trial(m, curve: LayerCurve, groups: list[np.ndarray], repair, k: int):
    """The prober's (A, B, b) for ``m`` with the first ``k`` groups of ``curve`` removed and the
    rest refitted: the weight with zero rows for the removed features beside the identity."""
    drop = np.zeros(m.d_in, bool)
    for g in curve.elimination.order[:k]:
        drop[groups[g]] = True
    keep = np.flatnonzero(~drop)
    w, b = repair(keep)
    full = np.zeros((m.d_in, m.d_out))
    full[keep] = w
    eye = np.eye(min(m.d_in, m.d_out))  # the side the prober's session carries as identity
    return (eye, full, b) if m.d_in <= m.d_out else (full, eye, b)


def uniform_counts(curves: list[LayerCurve], fraction: float, totals: list[int]) -> list[int]:
    """The same share of every layer's groups (rounded), within each layer's cap."""
    out = []
    for c, total in zip(curves, totals, strict=True):
        cap = len(c.path())
        out.append(min(cap, int(round(fraction * total))))
    return out


# --------------------------------------------------------------------------- repair


def repair_of(cfg, stats: LayerStats | None, weight: np.ndarray, bias: np.ndarray | None):
    """The pass's repair of one layer as a function of the kept input columns -> (W_keep, b):
    ridge least squares (``cfg.repair``) or plain slicing; ``b`` is zero where the layer has no
    bias and the rewrite adds none, so a probe sees what the rewrite writes."""
    adds_bias = cfg.repair and cfg.add_bias

    def repaired(keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if cfg.repair:
            w, b = ridge_refit(stats.gram, weight, bias, keep, ridge=cfg.ridge)
        else:
            w, b = np.asarray(weight)[keep], bias
        if b is None or (bias is None and not adds_bias):
            b = np.zeros(np.shape(weight)[1])
        return w, b

    return repaired


def ridge_refit(
    gram: Gram,
    weight: np.ndarray,
    bias: np.ndarray | None,
    keep: np.ndarray,
    *,
    ridge: float = DEFAULT_RIDGE,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of W for the kept features and a new bias that best reproduce the original
    output ``X W + b`` from ``[X_keep 1]`` (ridge least squares).

    The normal equations come from the full Gram: with ``Xa = [X 1]``, the target's
    cross term is ``Xa_keep^T Xa [W; b] = G_keep,: [W; b]``, so no second pass over
    the data is needed. Returns (W_keep [k, d_out], b [d_out]).
    """
    keep = np.asarray(keep, dtype=np.int64)
    h = _ridge_hessian(gram, ridge)
    g = gram.matrix()
    rows = np.concatenate([keep, [gram.dim]])
    lhs = h[np.ix_(rows, rows)]
    rhs = g[rows] @ augment(weight, bias)
    try:
        c = np.linalg.cholesky(lhs)
        sol = np.linalg.solve(c.T, np.linalg.solve(c, rhs))
    except np.linalg.LinAlgError:
        sol = np.linalg.lstsq(lhs, rhs, rcond=None)[0]
    return sol[:-1], sol[-1]
