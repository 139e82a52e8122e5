"""Numerics of the cross-layer weight-sharing pass, in numpy only (no graphs).

A group holds the same matrix role of n layers, ``Y_i = X_i @ W_i`` with W_i [d_in, d_out]
and calibration Grams ``G_i = X_i^T X_i``. Two ways to store the group in fewer numbers:

* basis sharing (Basis Sharing, Wang et al., ICLR 2025): ``W_i ~ B C_i`` with one basis
  B [d_in, r] for all n layers (``side="input"``: stack the whitened W_i side by side; the
  whitening is the group's pooled Gram, since one B must serve every layer's inputs), or
  ``W_i ~ C_i B`` with B [r, d_out] shared (``side="output"``: stack ``S_i^T W_i`` on top of
  each other; each block keeps its own whitening, so the dropped singular values are exactly
  the summed output error on calibration data);
* tying (the "relaxed" recursive transformers of Bae et al. 2024): one base W shared by the
  group plus a per-layer low-rank residual ``A_i B_i`` fitted by whitened SVD.

The per-rank energies of a basis decomposition feed the low-rank pass's allocator
(:mod:`onnxpress.factorization`) as one ``Candidate`` per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from onnxpress import factorization as fz

SIDES = ("input", "output")


@dataclass
class GroupDecomposition:
    """SVD of the stacked, whitened weights of one group."""

    side: str
    n: int
    d_in: int
    d_out: int
    dec: fz.Decomposition  # input side: the factorization's whitened SVD of [W_1 ... W_n]
    whitens: list[np.ndarray] | None = None  # output side: S_i per layer (dec.whiten is None)

    @property
    def energy(self) -> np.ndarray:
        return self.dec.energy

    def candidate(self) -> fz.Candidate:
        """The group as one matrix for the allocator: its factor cost r * (d_in' + d_out')
        is the basis (shared) plus the n per-layer coefficient matrices."""
        if self.side == "input":
            return fz.Candidate(self.d_in, self.n * self.d_out, self.energy)
        return fz.Candidate(self.n * self.d_in, self.d_out, self.energy)

    def cost(self, rank: int) -> int:
        c = self.candidate()
        return rank * (c.d_in + c.d_out)

    def factors(self, rank: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """(shared, [per-layer]): input side B [d_in, r] and C_i [r, d_out] (W_i ~ B C_i);
        output side B [r, d_out] and C_i [d_in, r] (W_i ~ C_i B)."""
        if self.side == "input":
            shared, coeffs = self.dec.factors(rank)  # [d_in, r], [r, n * d_out]
            return shared, [coeffs[:, i * self.d_out : (i + 1) * self.d_out] for i in range(self.n)]
        root = np.sqrt(self.dec.sigma[:rank])
        left = self.dec.u[:, :rank] * root  # blocks S_i^T C_i
        parts = [
            scipy.linalg.solve_triangular(s.T, left[i * self.d_in : (i + 1) * self.d_in], lower=False)
            for i, s in enumerate(self.whitens)
        ]
        return root[:, None] * self.dec.vt[:rank], parts

    def approximations(self, rank: int) -> list[np.ndarray]:
        shared, parts = self.factors(rank)
        return [shared @ p if self.side == "input" else p @ shared for p in parts]


def decompose_group(weights: list[np.ndarray], grams: list[np.ndarray], side: str,
                    eps: float = fz.DEFAULT_EPS) -> GroupDecomposition:
    """Whitened SVD of the group stacked along ``side`` (see the module docstring)."""
    d_in, d_out = weights[0].shape
    if side == "input":
        pooled = sum(grams) / len(grams)
        dec = fz.decompose(np.concatenate(weights, axis=1), pooled, eps=eps)
        return GroupDecomposition(side, len(weights), d_in, d_out, dec)
    whitens = [fz.whitening(g, eps) for g in grams]
    stacked = np.concatenate([s.T @ w for s, w in zip(whitens, weights, strict=True)], axis=0)
    u, sigma, vt = np.linalg.svd(stacked, full_matrices=False)
    return GroupDecomposition(side, len(weights), d_in, d_out, fz.Decomposition(u, sigma, vt, None), whitens)


def tie_rank(n: int, d_in: int, d_out: int, budget: int) -> int:
    """Largest per-layer residual rank whose tied group (one base + n rank-r residuals)
    costs at most ``budget`` parameters; 0 when not even rank 1 fits."""
    return max(0, (budget - d_in * d_out) // (n * (d_in + d_out)))


def tie_cost(n: int, d_in: int, d_out: int, rank: int) -> int:
    return d_in * d_out + n * rank * (d_in + d_out)


def fit_tie(weights: list[np.ndarray], grams: list[np.ndarray], rank: int,
            eps: float = fz.DEFAULT_EPS) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Shared base and per-layer residual factors (A_i [d_in, r], B_i [r, d_out]).

    The base minimises the summed output error of the group on calibration data,
    ``argmin_W sum_i ||X_i (W_i - W)||^2 = (sum G_i)^-1 sum G_i W_i`` (with the factorization's ridge);
    each residual W_i - W is then truncated by whitened SVD on its own layer's inputs.
    """
    chol = fz.whitening(sum(grams), eps)
    base = scipy.linalg.cho_solve((chol, True), sum(g @ w for g, w in zip(grams, weights, strict=True)))
    residuals = [fz.decompose(w - base, g, eps=eps).factors(rank) for w, g in zip(weights, grams, strict=True)]
    return base, residuals


def similarity(weights: list[np.ndarray], grams: list[np.ndarray], side: str, keep: float = 0.25,
               eps: float = fz.DEFAULT_EPS) -> np.ndarray:
    """[n, n] symmetric similarity of whitened weights Z_i = S_i^T W_i: the share of Z_j's energy
    inside the top ``keep`` fraction of Z_i's singular subspace on the shared ``side`` (input: column
    space, which a shared basis B must span; output: row space), averaged both ways."""
    zs = [fz.whitening(g, eps).T @ w for w, g in zip(weights, grams, strict=True)]
    if side == "output":
        zs = [z.T for z in zs]
    k = max(1, int(keep * min(zs[0].shape)))
    bases = [np.linalg.svd(z, full_matrices=False)[0][:, :k] for z in zs]
    norms = [float(np.sum(z * z)) or 1.0 for z in zs]
    captured = np.array([[np.sum((u.T @ z) ** 2) / nz for z, nz in zip(zs, norms, strict=True)] for u in bases])
    return 0.5 * (captured + captured.T)


def similar_groups(sim: np.ndarray, size: int) -> list[list[int]]:
    """Greedy grouping: seed each group with the most similar free pair, then add the free member
    with the highest mean similarity to the group until it has ``size`` members."""
    free = set(range(len(sim)))
    groups = []
    while len(free) >= 2 and size >= 2:
        i, j = max(((a, b) for a in free for b in free if a < b), key=lambda p: sim[p])
        group = [i, j]
        free -= {i, j}
        while len(group) < size and free:
            best = max(free, key=lambda c: sim[c, group].mean())
            group.append(best)
            free.remove(best)
        groups.append(sorted(group))
    return groups + [[i] for i in sorted(free)]
