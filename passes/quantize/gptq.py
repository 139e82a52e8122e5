"""Weight quantisers and GPTQ error-compensated rounding.

Weights are in ONNX MatMul layout ``W[K, N]`` (K = input features, the reduction
axis). GPTQ (Frantar et al. 2022) quantises the K rows one at a time and spreads each
row's rounding error over the rows not yet quantised, using the inverse Hessian
``H = X^T X`` of the layer's calibration inputs, so that ``||X W - X Ŵ||`` (not
``||W - Ŵ||``) is minimised.

A quantiser is an object with ``__call__(k, row) -> dequantised row`` and optionally
``begin_group(k, rows)`` (called with the *updated* rows of a group before its first
row is rounded, so group scales see the error already pushed into them).
"""

from __future__ import annotations

import numpy as np
from scipy.linalg.lapack import dpotrf, dtrtri

# Per-channel int8 weights: +-127, or +-64 ("reduce_range") so that a u8 x s8 pair
# sum never saturates the int16 intermediate of AVX2's vpmaddubsw (2*255*64 < 32767).
INT8_QMAX = {False: 127, True: 64}


def channel_scales(weight: np.ndarray, qmax: int, clip_search: bool = False, hessian_diag=None) -> np.ndarray:
    """Symmetric per-output-channel scales of ``weight[K, N]``. ``clip_search`` shrinks
    each column's range where that lowers its (input-energy weighted) rounding error."""
    absmax = np.abs(weight).max(axis=0).astype(np.float64)
    absmax = np.where(absmax > 0, absmax, 1.0)
    if not clip_search:
        return (absmax / qmax).astype(np.float32)
    # float32: the search only ranks candidates, and halves the time on large (LM head) weights
    d = np.ones(weight.shape[0], np.float32)
    if hessian_diag is not None:
        d = (np.maximum(hessian_diag, 0) + 1e-12).astype(np.float32)
    w = weight.astype(np.float32)
    best_err = np.full(weight.shape[1], np.inf)
    best = absmax / qmax
    for frac in np.linspace(0.6, 1.0, 21):
        s = (absmax * frac / qmax).astype(np.float32)
        err = (d[:, None] * (np.clip(np.round(w / s), -qmax, qmax) * s - w) ** 2).sum(axis=0)
        better = err < best_err
        best_err, best = np.where(better, err, best_err), np.where(better, s, best)
    return best.astype(np.float32)


class ChannelQuantizer:
    """Symmetric per-output-channel integer grid: q = clip(round(w / s), -qmax, qmax)."""

    def __init__(self, scales: np.ndarray, qmax: int):
        self.scales = scales.astype(np.float64)
        self.qmax = qmax

    def codes(self, w: np.ndarray) -> np.ndarray:
        return np.clip(np.round(w / self.scales), -self.qmax, self.qmax)

    def __call__(self, k: int, row: np.ndarray) -> np.ndarray:
        return self.codes(row) * self.scales


class BlockQuantizer:
    """Asymmetric (or symmetric) ``bits``-bit blocks of ``block_size`` rows along K with one
    scale and zero point per (block, column), as MatMulNBits stores them.

    Ranges are searched per block (shrinking min/max) to minimise the block's rounding
    error, and always contain 0 like ORT's quantiser. Codes are kept for packing, rounded
    against the scale as ``scale_dtype`` stores it (float16 scales are kept at or above its
    smallest normal number, so none flushes to zero or loses precision)."""

    def __init__(
        self,
        shape: tuple[int, int],
        bits: int,
        block_size: int,
        symmetric: bool = False,
        clip_search: bool = True,
        scale_dtype: type = np.float32,
    ):
        self.K, self.N = shape
        self.scale_dtype = np.dtype(scale_dtype)
        self.bits, self.block_size, self.symmetric, self.clip_search = (
            bits,
            block_size,
            symmetric,
            clip_search,
        )
        nblocks = -(-self.K // block_size)
        self.scales = np.ones((nblocks, self.N), dtype=self.scale_dtype)
        self.zero_points = np.full((nblocks, self.N), 1 << (bits - 1), dtype=np.uint8)
        self.q = np.zeros((nblocks * block_size, self.N), dtype=np.uint8)
        self._ready = np.zeros(nblocks, dtype=bool)

    def begin_group(self, k: int, rows: np.ndarray) -> None:
        b = k // self.block_size
        self.scales[b], self.zero_points[b] = self._params(rows)
        self._ready[b] = True

    def _params(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        qmax = (1 << self.bits) - 1
        lo0 = np.minimum(rows.min(axis=0), 0.0).astype(np.float64)
        hi0 = np.maximum(rows.max(axis=0), 0.0).astype(np.float64)
        best_err = np.full(rows.shape[1], np.inf)
        best_s, best_z = np.ones(rows.shape[1]), np.zeros(rows.shape[1])
        for frac in np.linspace(0.7, 1.0, 16) if self.clip_search else (1.0,):
            lo, hi = lo0 * frac, hi0 * frac
            if self.symmetric:
                half = 1 << (self.bits - 1)
                bound = np.maximum(np.abs(lo), np.abs(hi))
                s = np.where(bound > 0, bound / half, 1.0)
                z = np.full_like(s, half)
            else:
                s = np.where(hi > lo, (hi - lo) / qmax, 1.0)
                z = np.clip(np.round(-lo / s), 0, qmax)
            if self.scale_dtype == np.float16:
                s = np.maximum(s, float(np.finfo(np.float16).tiny))
                z = np.clip(np.round(-lo / s), 0, qmax) if not self.symmetric else z
            s = s.astype(self.scale_dtype).astype(np.float64)  # what the model will store
            deq = (np.clip(np.round(rows / s) + z, 0, qmax) - z) * s
            err = ((deq - rows) ** 2).sum(axis=0)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_s, best_z = np.where(better, s, best_s), np.where(better, z, best_z)
        return best_s.astype(self.scale_dtype), best_z.astype(np.uint8)

    def __call__(self, k: int, row: np.ndarray) -> np.ndarray:
        b = k // self.block_size
        if not self._ready[b]:
            raise RuntimeError(f"block {b} rounded before begin_group set its scale")
        s, z = self.scales[b].astype(np.float64), self.zero_points[b].astype(np.float64)
        q = np.clip(np.round(row / s) + z, 0, (1 << self.bits) - 1)
        self.q[k] = q.astype(np.uint8)
        return (q - z) * s

    def quantize_all(self, weight: np.ndarray) -> np.ndarray:
        """Round to nearest (no error compensation); returns the dequantised weight."""
        out = np.empty_like(weight, dtype=np.float64)
        for b0 in range(0, self.K, self.block_size):
            rows = weight[b0 : b0 + self.block_size].astype(np.float64)
            self.begin_group(b0, rows)
            for i in range(rows.shape[0]):
                out[b0 + i] = self(b0 + i, rows[i])
        return out


def gptq(
    weight: np.ndarray,
    hessian: np.ndarray,
    quantizer,
    *,
    block: int = 128,
    damp: float = 0.01,
    group_size: int | None = None,
    act_order: bool = False,
) -> np.ndarray:
    """Error-compensated rounding of ``weight[K, N]``; returns the dequantised weight.

    ``hessian`` is ``X^T X`` (K x K) of the calibration inputs; ``damp`` adds that
    fraction of its mean diagonal for numerical stability. ``group_size``: call
    ``quantizer.begin_group`` at every multiple of it (``block`` must be a multiple).
    ``act_order`` rounds the rows with the largest input energy first (their error is then
    spread over the most rows); group parameters are then fixed up front from the original
    weight ("static groups"), so that each block keeps one scale however its rows are visited.

    Runs in torch: the lazy block updates are one GEMM per block and the row loop is cheap,
    where the same loop in numpy at one thread dominated a 200-MatMul decoder's pass time."""
    import torch

    # one working copy, which the error updates go into, and Q: in float64 an LM head's or a 7 B
    # model's MLP weight takes hundreds of MB
    W0 = np.array(weight, dtype=np.float64)
    K = W0.shape[0]
    H = hessian.astype(np.float64).copy()
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    W0[dead] = 0.0  # inputs that never fire: their weights do not matter
    if group_size:
        block = max(group_size, block - block % group_size)
    H[np.diag_indices(K)] += damp * float(np.mean(np.diag(H)))
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(K)
    if act_order and group_size and hasattr(quantizer, "begin_group"):
        for g in range(0, K, group_size):
            quantizer.begin_group(g, W0[g : g + group_size])
        group_size = None  # already set: the loop below must not reset them
    U = torch.from_numpy(_inverse_cholesky_upper(H[np.ix_(perm, perm)]))
    W = torch.from_numpy(W0[perm] if act_order else W0)
    del W0
    Q = torch.zeros_like(W)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[i1:i2].clone()
        E = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            k = i1 + i
            if group_size and k % group_size == 0 and hasattr(quantizer, "begin_group"):
                quantizer.begin_group(k, W1[i : i + group_size].numpy())
            q = torch.from_numpy(np.asarray(quantizer(int(perm[k]), W1[i].numpy()), dtype=np.float64))
            Q[k] = q
            err = (W1[i] - q) / U1[i, i]
            W1[i + 1 :].sub_(torch.outer(U1[i, i + 1 :], err))
            E[i] = err
        W[i2:].sub_(U[i1:i2, i2:].T @ E)
    if not act_order:
        return Q.numpy()
    out = np.empty_like(Q.numpy())
    out[perm] = Q.numpy()
    return out


def _inverse_cholesky_upper(H: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U; GPTQ's trick: its rows are the per-step
    updates), from one Cholesky and one triangular inverse: with J the reversal permutation
    and J H J = R R^T, U = J R^-1 J. Adds damping until the factorisation succeeds."""
    K = H.shape[0]
    flipped = np.ascontiguousarray(H[::-1, ::-1])
    extra = 0.0
    for _ in range(8):
        R, info = dpotrf(flipped + extra * np.eye(K) if extra else flipped, lower=1, clean=1)
        if info == 0:
            Rinv, info = dtrtri(R, lower=1)
            if info == 0 and np.isfinite(Rinv).all():
                # a copy, not ascontiguousarray: that returns a 1 x 1 view with its negative strides,
                # which torch.from_numpy refuses
                return Rinv[::-1, ::-1].copy()
        extra = max(extra * 10, 1e-6 * float(np.mean(np.diag(H))) + 1e-12)
    raise np.linalg.LinAlgError("Hessian is not positive definite even with damping")
