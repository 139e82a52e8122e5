"""Factorising weight matrices, in numpy only (no graphs): one matrix's (whitened) SVD,
one parameter budget shared across many, and the output error of a factorised matrix
from calibration statistics. The low-rank and weight-sharing passes stand on it.

Conventions: a linear layer computes ``Y = X @ W`` with ``W`` of shape [d_in, d_out];
its calibration inputs are summarised by the Gram matrix ``G = X^T X`` (and, for
sequential fitting, the cross term ``C = X'^T X`` between the compressed model's
inputs X' and the original ones X, both on the same tokens).

Activation-aware factorisation (SVD-LLM, Wang et al. 2024): with ``G = S S^T``
(Cholesky), ``||X W - X W_r||_F = ||S^T W - S^T W_r||_F``, so the best rank-r
``W_r`` for the *output* error is ``S^-T`` times the truncated SVD of ``S^T W``, and
the squared singular values of ``S^T W`` are exactly the output error each rank
removes. Plain truncated SVD of ``W`` (``G = I``) is the baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

# Ridge added to the Gram diagonal, relative to its mean diagonal: keeps the Cholesky
# defined for rank-deficient calibration data (dead channels, few tokens) while
# changing the well-conditioned directions negligibly.
DEFAULT_EPS = 1e-4


def break_even_rank(d_in: int, d_out: int) -> int:
    """Largest rank at which two factors hold strictly fewer parameters (and MACs) than
    the matrix: r * (d_in + d_out) < d_in * d_out. 0 means no split can ever pay."""
    return max(0, (d_in * d_out - 1) // (d_in + d_out))


def factor_cost(rank: int, d_in: int, d_out: int) -> int:
    """Parameters (= MACs per row of X) of the layer at ``rank``; the unsplit matrix
    whenever splitting would not save anything."""
    return min(rank * (d_in + d_out), d_in * d_out)


def whitening(gram: np.ndarray, eps: float = DEFAULT_EPS) -> np.ndarray:
    """Lower-triangular S with S S^T = G + eps * mean(diag G) * I."""
    gram = np.asarray(gram, dtype=np.float64)
    gram = 0.5 * (gram + gram.T)
    ridge = eps * max(float(np.mean(np.diag(gram))), 1e-12)
    for _ in range(6):  # Cholesky may still fail on a numerically indefinite Gram: grow the ridge
        try:
            return np.linalg.cholesky(gram + ridge * np.eye(len(gram)))
        except np.linalg.LinAlgError:
            ridge *= 10
    raise np.linalg.LinAlgError("calibration Gram matrix is not positive definite even with a large ridge")


@dataclass
class Decomposition:
    """SVD of the (whitened) weight: ``S^T W_target = U diag(sigma) Vt``.

    ``sigma**2`` are the squared output errors per dropped rank, on the calibration
    data for the whitened method and on the weights for the plain one.
    """

    u: np.ndarray
    sigma: np.ndarray
    vt: np.ndarray
    whiten: np.ndarray | None  # S (lower-triangular); None for plain SVD

    @property
    def energy(self) -> np.ndarray:
        return self.sigma.astype(np.float64) ** 2

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """A [d_in, r], B [r, d_out] with A @ B the best rank-r approximation.

        Each rank-one term is split so that its column of A and its row of B have the same
        norm: the factors then have similar magnitudes (fp16 factors stay in range), and an
        optimizer that steps every weight alike (distillation's AdamW) changes both by the
        same share. Whitening alone leaves A's columns about 50x smaller than B's rows on
        MiniLM, so each step would move A ten times further, relative to its size, than an
        unsplit weight.
        """
        rank = int(rank)
        left = self.u[:, :rank] * self.sigma[:rank]
        if self.whiten is not None:
            left = scipy.linalg.solve_triangular(self.whiten.T, left, lower=False)  # S^-T U_r Sigma_r
        norms = np.linalg.norm(left, axis=0)  # the rows of vt have norm 1
        scale = np.sqrt(norms, where=norms > 0, out=np.ones_like(norms))
        return left / scale, scale[:, None] * self.vt[:rank]


def decompose(
    w: np.ndarray,
    gram: np.ndarray | None = None,
    *,
    cross: np.ndarray | None = None,
    eps: float = DEFAULT_EPS,
    residual: np.ndarray | None = None,
    prior: float = 0.0,
) -> Decomposition:
    """Decompose ``w`` [d_in, d_out] for truncation.

    ``gram=None``: plain SVD of w. With ``gram`` (= X'^T X'): whitened SVD. With
    ``cross`` (= X'^T X, X the original model's inputs on the same tokens) the target
    is the least-squares fit of the original outputs from the compressed inputs,
    ``W_ls = G'^-1 C W``, so the factors also undo errors made upstream; the whitened
    truncation of W_ls is then the optimal rank-r fit of X W from X' (reduced-rank
    regression). ``residual`` (= X'^T D, with ``cross``) adds D to the target: the upstream
    error of what the output is added to, so the fit cancels the part X' predicts.

    ``prior`` (= lambda, with ``cross``) adds lambda * ||W_r - w||^2 to the refit's objective:
    the same problem on the data augmented by sqrt(lambda) I -> sqrt(lambda) w, so it is solved
    exactly with G' + lambda I and C w + lambda w. With few tokens per input dimension the
    unregularised refit over-fits the calibration tokens; the prior pulls it back towards w.
    """
    w = np.asarray(w, dtype=np.float64)
    if gram is None:
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        return Decomposition(u, s, vt, None)
    gram = np.asarray(gram, dtype=np.float64)
    if cross is not None and prior > 0:
        gram = gram + prior * np.eye(len(gram))
    chol = whitening(gram, eps)
    target = w
    if cross is not None:
        rhs = np.asarray(cross, dtype=np.float64) @ w
        if residual is not None:
            rhs = rhs + np.asarray(residual, dtype=np.float64)
        if prior > 0:
            rhs = rhs + prior * w
        target = scipy.linalg.cho_solve((chol, True), rhs)
    u, s, vt = np.linalg.svd(chol.T @ target, full_matrices=False)
    return Decomposition(u, s, vt, chol)


@dataclass(frozen=True)
class Candidate:
    """One matrix the allocator may split: its shape, its per-rank truncation energies
    (descending) and the weight of its loss in the global objective."""

    d_in: int
    d_out: int
    energy: np.ndarray
    weight: float = 1.0

    @property
    def full_cost(self) -> int:
        return self.d_in * self.d_out

    def loss(self, rank: int) -> float:
        """Normalised truncation loss: the share of the output energy dropped at ``rank``."""
        total = float(self.energy.sum())
        return float(self.energy[rank:].sum()) / total if total > 0 else 0.0


def uniform_ranks(candidates: list[Candidate], fraction: float) -> list[int | None]:
    """Every matrix loses ``fraction`` of its own parameters (None: leave unsplit)."""
    ranks: list[int | None] = []
    for c in candidates:
        rank = int(np.floor((1.0 - fraction) * c.full_cost / (c.d_in + c.d_out)))
        ranks.append(rank if 1 <= rank <= break_even_rank(c.d_in, c.d_out) else None)
    return ranks


def global_ranks(candidates: list[Candidate], budget: float) -> list[int | None]:
    """Ranks that save at least ``budget`` parameters (as far as possible) at the least
    total weighted normalised truncation loss.

    Greedy on the lower convex hull of each matrix's (cost, loss) curve: a matrix's
    first move jumps from unsplit to the rank with the best loss per parameter saved
    below break-even (nothing between saves anything), later moves drop one rank each.
    Tail sums of descending energies are convex in the rank, so each matrix's move
    ratios increase along its path and taking all moves in global ratio order is the
    greedy (water-filling) solution.
    """
    moves: list[tuple[float, int, int, int]] = []  # (loss per param saved, matrix, new rank, params saved)
    for i, c in enumerate(candidates):
        r_max = break_even_rank(c.d_in, c.d_out)
        if r_max < 1:
            continue
        total = float(c.energy.sum()) or 1.0
        tail = np.concatenate([np.cumsum(c.energy[::-1])[::-1], [0.0]]) / total  # tail[r] = loss at rank r
        ranks = np.arange(1, r_max + 1)
        saved = c.full_cost - ranks * (c.d_in + c.d_out)
        ratio = c.weight * tail[ranks] / saved
        first = int(ranks[np.argmin(ratio)])  # ties -> the highest such rank (argmin takes the first)
        last = float(ratio[first - 1])
        moves.append((last, i, first, int(saved[first - 1])))
        step = c.d_in + c.d_out
        for r in range(first - 1, 0, -1):
            # running max: rounding must never put a later move of a path before an earlier one
            last = max(last, c.weight * float(tail[r] - tail[r + 1]) / step)
            moves.append((last, i, r, step))
    # Stable sort keeps each matrix's moves in path order when ratios tie.
    moves.sort(key=lambda m: m[0])
    ranks_out: list[int | None] = [None] * len(candidates)
    saved_total = 0.0
    for _, i, rank, saved in moves:
        if saved_total >= budget:
            break
        ranks_out[i] = rank
        saved_total += saved
    return ranks_out


def params_saved(candidates: list[Candidate], ranks: list[int | None]) -> int:
    return sum(c.full_cost - factor_cost(r, c.d_in, c.d_out) for c, r in zip(candidates, ranks, strict=True) if r)


def bias_shift(
    w: np.ndarray, w_new: np.ndarray, mean_in: np.ndarray, mean_in_new: np.ndarray | None = None
) -> np.ndarray:
    """Change of bias that restores the mean output on calibration data:
    E[x] W - E[x'] W_r (x' = the compressed model's inputs, x when not given)."""
    mean_in_new = mean_in if mean_in_new is None else mean_in_new
    return np.asarray(mean_in, np.float64) @ w - np.asarray(mean_in_new, np.float64) @ w_new


def allocate_measured(curves: list[list[tuple[float, float]]], budget: float) -> list[float]:
    """Parameters to save in each unit, ``budget`` in all, from measured (saved, loss) points
    per unit (saving nothing costs nothing), at the least total loss assuming losses add.

    Greedy on the lower convex hull of each unit's points: hull segments in order of loss per
    parameter saved, the last one taken in part so the total is exactly ``budget`` (as far as
    the units can give). Points above the hull (noisy measurements) are never chosen.
    """
    moves: list[tuple[float, int, float]] = []  # (loss per parameter saved, unit, parameters)
    for u, points in enumerate(curves):
        hull = [(0.0, 0.0)]
        for saved, loss in sorted(points):
            while len(hull) >= 2 and _on_or_above(hull[-2], hull[-1], (saved, loss)):
                hull.pop()
            hull.append((saved, loss))
        for (s0, l0), (s1, l1) in zip(hull, hull[1:], strict=False):
            if s1 > s0:
                moves.append(((l1 - l0) / (s1 - s0), u, s1 - s0))
    # a unit's hull slopes increase along its path, so a stable sort keeps each path in order
    moves.sort(key=lambda mv: mv[0])
    out = [0.0] * len(curves)
    left = budget
    for _, u, amount in moves:
        if left <= 0:
            break
        out[u] += min(amount, left)
        left -= amount
    return out


def _on_or_above(o, a, b) -> bool:
    """Whether a lies on or above the segment o-b (then a is not on the lower hull)."""
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]) <= 0


def output_error(m, w_r: np.ndarray, s, bias: np.ndarray | None, res=None) -> float:
    """||X' W_r + b' - (X W + b) - D|| / ||X W + b|| on the calibration tokens, from the
    second moments (X' = the compressed model's inputs, X = the original ones, D = the
    upstream error of the residual the output is added to; zero without ``res``)."""
    w, n = m.weight, s.count
    b0 = m.bias if m.bias is not None else np.zeros(m.d_out)
    b1 = bias if bias is not None else np.zeros(m.d_out)
    def trace(left, gram, right):  # tr(left^T gram right)
        return float(np.sum(left * (gram @ right)))

    new_sq = trace(w_r, s.xtx, w_r) + 2 * (s.sum @ w_r) @ b1 + n * b1 @ b1
    ref_sq = trace(w, s.xtx_ref, w) + 2 * (s.sum_ref @ w) @ b0 + n * b0 @ b0
    dot = trace(w_r, s.cross, w) + (s.sum @ w_r) @ b0 + (s.sum_ref @ w) @ b1 + n * b1 @ b0
    err_sq = new_sq - 2 * dot + ref_sq
    if res is not None:  # ||P - D||^2 = ||P||^2 - 2 <P, D> + ||D||^2 with P = X'W_r + b' - XW - b
        p_dot_d = float(np.sum(w_r * res.cross)) + b1 @ res.total - float(np.sum(w * res.cross_ref)) - b0 @ res.total
        err_sq += res.sq - 2 * p_dot_d
    return float(np.sqrt(max(err_sq, 0.0) / max(ref_sq, 1e-30)))
