"""Activation range calibration for static quantization.

A :class:`StreamingHistogram` accumulates one tensor's values over the calibration
batches without keeping them; :func:`choose_range` turns it into the (lo, hi) range a
QuantizeLinear scale/zero point is derived from, by one of:

- ``minmax``: the observed extremes (exact, outlier-sensitive);
- ``percentile``: drop ``percentile``% of the mass at each tail;
- ``entropy``: TensorRT-style KL-divergence threshold on |x|;
- ``mse``: the clip range minimising the expected quantisation MSE over the histogram.

``auto`` (in :func:`choose_range_for_linear`) scores each candidate by what matters
downstream, the error of the consuming MatMul's output on a sample of real rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RANGE_METHODS = ("minmax", "percentile", "entropy", "mse", "auto")

QRANGES = {"uint8": (0, 255), "int8": (-128, 127)}


class StreamingHistogram:
    """Histogram with bins of width ``w`` aligned to 0; when the data outgrows
    ``max_bins`` the width doubles and neighbouring bins merge exactly, so the result
    does not depend on batch order beyond that resolution."""

    def __init__(self, max_bins: int = 4096):
        self.max_bins = max_bins
        self.width = 0.0
        self.start = 0  # index (in units of width, relative to 0) of counts[0]
        self.counts = np.zeros(0, dtype=np.int64)
        self.min = np.inf
        self.max = -np.inf
        self.total = 0

    def update(self, values: np.ndarray) -> None:
        x = np.asarray(values, dtype=np.float32).ravel()
        x = x[np.isfinite(x)]
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.total += x.size
        if self.width == 0.0:
            span = max(abs(lo), abs(hi), 1e-8)
            self.width = 2 * span / (self.max_bins // 2)
        first, last = int(np.floor(lo / self.width)), int(np.floor(hi / self.width))
        if self.counts.size:
            first, last = min(first, self.start), max(last, self.start + self.counts.size - 1)
        while last - first + 1 > self.max_bins:
            self._merge_pairs()
            first, last = first // 2, last // 2
        if not self.counts.size:
            self.start, self.counts = first, np.zeros(last - first + 1, dtype=np.int64)
        elif first < self.start or last >= self.start + self.counts.size:
            grown = np.zeros(last - first + 1, dtype=np.int64)
            grown[self.start - first : self.start - first + self.counts.size] = self.counts
            self.start, self.counts = first, grown
        idx = np.floor(x / self.width).astype(np.int64) - self.start
        np.clip(idx, 0, self.counts.size - 1, out=idx)
        self.counts += np.bincount(idx, minlength=self.counts.size)

    def _merge_pairs(self) -> None:
        new_start = self.start // 2
        idx = (self.start + np.arange(self.counts.size)) // 2 - new_start
        merged = np.zeros(idx[-1] + 1 if idx.size else 0, dtype=np.int64)
        np.add.at(merged, idx, self.counts)
        self.start, self.counts, self.width = new_start, merged, self.width * 2

    @property
    def edges(self) -> np.ndarray:
        return (self.start + np.arange(self.counts.size + 1)) * self.width

    @property
    def centers(self) -> np.ndarray:
        return (self.start + np.arange(self.counts.size) + 0.5) * self.width


@dataclass(frozen=True)
class QParams:
    scale: float
    zero_point: int
    qtype: str  # "uint8" | "int8"

    def fake_quant(self, x: np.ndarray) -> np.ndarray:
        qmin, qmax = QRANGES[self.qtype]
        q = np.clip(np.round(x / self.scale) + self.zero_point, qmin, qmax)
        return ((q - self.zero_point) * self.scale).astype(np.float32)


def qparams_from_range(lo: float, hi: float, qtype: str, symmetric: bool | None = None) -> QParams:
    """Scale/zero point for [lo, hi] (always widened to contain 0 so that zero padding is exact).
    int8 activations are symmetric (zero point 0), as ORT's s8 kernels expect."""
    qmin, qmax = QRANGES[qtype]
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric is None:
        symmetric = qtype == "int8"
    if symmetric:
        bound = max(abs(lo), abs(hi))
        scale = bound / ((qmax - qmin) / 2) if bound > 0 else 1.0
        zero_point = 0 if qtype == "int8" else 128
    else:
        scale = (hi - lo) / (qmax - qmin) if hi > lo else 1.0
        zero_point = int(np.clip(round(qmin - lo / scale), qmin, qmax))
    return QParams(float(np.float32(scale)), zero_point, qtype)


def expected_mse(hist: StreamingHistogram, qp: QParams) -> float:
    """Quantisation MSE implied by the histogram: clipping error at bin centres plus
    uniform rounding noise (scale^2/12) for in-range mass."""
    c, n = hist.centers, hist.counts
    qmin, qmax = QRANGES[qp.qtype]
    lo, hi = (qmin - qp.zero_point) * qp.scale, (qmax - qp.zero_point) * qp.scale
    clipped = np.clip(c, lo, hi)
    inside = (c >= lo) & (c <= hi)
    err = (c - clipped) ** 2 + np.where(inside, qp.scale**2 / 12, 0.0)
    return float((err * n).sum() / max(n.sum(), 1))


def percentile_range(hist: StreamingHistogram, percentile: float) -> tuple[float, float]:
    tail = (100.0 - percentile) / 100.0
    cdf = np.cumsum(hist.counts) / max(hist.total, 1)
    edges = hist.edges
    lo_i = int(np.searchsorted(cdf, tail, side="left"))
    hi_i = int(np.searchsorted(cdf, 1.0 - tail, side="left"))
    lo = max(hist.min, edges[min(lo_i, len(edges) - 1)])
    hi = min(hist.max, edges[min(hi_i + 1, len(edges) - 1)])
    return float(lo), float(hi)


def mse_range(hist: StreamingHistogram, qtype: str, steps: int = 64) -> tuple[float, float]:
    """Coordinate search over the two clip points (fractions of min and max), each sweep
    evaluated for all candidates at once."""
    qmin, qmax = QRANGES[qtype]
    c, n = hist.centers, hist.counts.astype(np.float64)
    fractions = np.linspace(0.05, 1.0, steps)
    lo0, hi0 = min(hist.min, 0.0), max(hist.max, 0.0)
    symmetric = qtype == "int8"

    def errors(los: np.ndarray, his: np.ndarray) -> np.ndarray:
        if symmetric:
            bound = np.maximum(np.abs(los), np.abs(his))
            scale = np.where(bound > 0, bound / ((qmax - qmin) / 2), 1.0)
            zp = np.zeros_like(scale)
        else:
            scale = np.where(his > los, (his - los) / (qmax - qmin), 1.0)
            zp = np.clip(np.round(qmin - los / scale), qmin, qmax)
        lo_q, hi_q = ((qmin - zp) * scale)[:, None], ((qmax - zp) * scale)[:, None]
        clipped = np.clip(c[None, :], lo_q, hi_q)
        inside = (c[None, :] >= lo_q) & (c[None, :] <= hi_q)
        err = (c[None, :] - clipped) ** 2 + np.where(inside, (scale**2 / 12)[:, None], 0.0)
        return (err * n[None, :]).sum(axis=1)

    lo, hi = lo0, hi0
    for _ in range(2):
        hi = float(hi0 * fractions[np.argmin(errors(np.full(steps, lo), hi0 * fractions))])
        lo = (
            float(lo0 * fractions[np.argmin(errors(lo0 * fractions, np.full(steps, hi)))]) if lo0 < 0 else lo0
        )
    full = errors(np.array([lo0]), np.array([hi0]))[0]
    return (lo, hi) if errors(np.array([lo]), np.array([hi]))[0] <= full else (lo0, hi0)


def entropy_range(hist: StreamingHistogram, num_quantized_bins: int = 128) -> tuple[float, float]:
    """KL-divergence threshold (TensorRT's method) on the |x| distribution."""
    centers, counts = hist.centers, hist.counts.astype(np.float64)
    nbins = 2048
    bound = max(abs(hist.min), abs(hist.max), 1e-12)
    abs_counts, _ = np.histogram(np.abs(centers), bins=nbins, range=(0, bound), weights=counts)
    best_t, best_kl = bound, np.inf
    for i in range(num_quantized_bins, nbins + 1, 64):
        p = abs_counts[:i].copy()
        p[i - 1] += abs_counts[i:].sum()
        if p.sum() == 0:
            continue
        # quantise the first i bins into num_quantized_bins and expand back
        chunks = np.array_split(abs_counts[:i], num_quantized_bins)
        q = np.concatenate([np.where(ch > 0, ch.sum() / max((ch > 0).sum(), 1), 0.0) for ch in chunks])
        pn, qn = p / p.sum(), q / max(q.sum(), 1e-12)
        mask = pn > 0
        kl = float(np.sum(pn[mask] * np.log(pn[mask] / np.maximum(qn[mask], 1e-12))))
        if kl < best_kl:
            best_kl, best_t = kl, bound * i / nbins
    return max(hist.min, -best_t), min(hist.max, best_t)


def choose_range(
    hist: StreamingHistogram, method: str, qtype: str, percentile: float = 99.99
) -> tuple[float, float]:
    if hist.total == 0:
        return 0.0, 0.0
    if method == "minmax":
        return hist.min, hist.max
    if method == "percentile":
        return percentile_range(hist, percentile)
    if method == "entropy":
        return entropy_range(hist)
    if method == "mse":
        return mse_range(hist, qtype)
    raise ValueError(f"unknown range method {method!r}")


def choose_range_for_linear(
    hist: StreamingHistogram,
    sample: np.ndarray | None,
    weights: list[np.ndarray],
    method: str,
    qtype: str,
    percentile: float = 99.99,
) -> tuple[QParams, str]:
    """QParams for an activation feeding the MatMuls ``weights`` ([K, N] each).

    ``auto`` tries every method and keeps the one whose fake-quantised input moves the
    consumers' outputs least on ``sample`` (rows of real activations); that weights
    each channel by how much the weights amplify it, which a histogram cannot."""
    if method != "auto" or sample is None or not len(sample):
        chosen = "mse" if method == "auto" else method
        return qparams_from_range(*choose_range(hist, chosen, qtype, percentile), qtype), chosen
    x = sample.astype(np.float32)
    refs = [x @ w for w in weights]
    best: tuple[float, QParams, str] | None = None
    for name in ("minmax", "percentile", "entropy", "mse"):
        qp = qparams_from_range(*choose_range(hist, name, qtype, percentile), qtype)
        xq = qp.fake_quant(x)
        err = sum(
            float(((xq @ w - r) ** 2).sum() / max((r**2).sum(), 1e-30))
            for w, r in zip(weights, refs, strict=True)
        )
        if best is None or err < best[0]:
            best = (err, qp, name)
    assert best is not None
    return best[1], best[2]
