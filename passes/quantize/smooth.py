"""SmoothQuant scales (Xiao et al. 2022) and a per-input choice of the migration strength.

Dividing input channel j by s_j and multiplying row j of every consumer weight by s_j
leaves ``X W`` unchanged in float but moves activation outliers into the weights, which
per-channel weight quantisation absorbs far better than per-tensor activation
quantisation. ``alpha`` sets how much moves; the best value differs per tensor (LayerNorm
outputs vs post-GELU activations), and smoothing can hurt inputs without outliers, so
:func:`choose_alpha` scores each candidate (and "off") by the quantised consumers' output
error on captured rows.
"""

from __future__ import annotations

import numpy as np

from onnxpress.passes.quantize.calibrate import StreamingHistogram, choose_range, qparams_from_range

ALPHA_CANDIDATES = (0.3, 0.5, 0.65, 0.8)


def smooth_scales(act_absmax: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha) over the rows j of all consumer weights ``[K, N]``."""
    w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    a = np.maximum(act_absmax.astype(np.float64), 1e-5)
    w = np.maximum(w_max.astype(np.float64), 1e-5)
    s = a**alpha / w ** (1 - alpha)
    s = np.where((act_absmax > 0) & (w_max > 0), s, 1.0)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def _fake_quant_weight(w: np.ndarray) -> np.ndarray:
    scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / 127
    return np.clip(np.round(w / scale), -127, 127) * scale


def _fake_quant_act(x: np.ndarray, qtype: str, method: str) -> np.ndarray:
    hist = StreamingHistogram(1024)
    hist.update(x)
    return qparams_from_range(*choose_range(hist, method, qtype), qtype).fake_quant(x)


def quantized_error(
    x: np.ndarray,
    weights: list[np.ndarray],
    s: np.ndarray | None,
    qtype: str,
    method: str,
    refs: list[np.ndarray] | None = None,
) -> float:
    """Relative output error of the consumers with int8 input and weights, after smoothing by
    ``s``; ``refs`` (the float outputs ``x @ w``) may be passed in when scoring many ``s``."""
    xs = x if s is None else x / s
    xq = _fake_quant_act(xs, qtype, method)
    total = 0.0
    for i, w in enumerate(weights):
        ref = x @ w if refs is None else refs[i]
        ws = w if s is None else w * s[:, None]
        total += float(((xq @ _fake_quant_weight(ws) - ref) ** 2).sum() / max((ref**2).sum(), 1e-30))
    return total


def choose_alpha(
    act_absmax: np.ndarray,
    sample: np.ndarray | None,
    weights: list[np.ndarray],
    qtype: str = "uint8",
    method: str = "mse",
    candidates=ALPHA_CANDIDATES,
) -> tuple[float | None, float, float]:
    """Best alpha (None: do not smooth) with its error and the unsmoothed error."""
    if sample is None or not len(sample):
        return 0.5, float("nan"), float("nan")
    refs = [sample @ w for w in weights]
    base = quantized_error(sample, weights, None, qtype, method, refs)
    best: tuple[float | None, float] = (None, base)
    for alpha in candidates:
        s = smooth_scales(act_absmax, weights, alpha)
        err = quantized_error(sample, weights, s, qtype, method, refs)
        if err < best[1] * 0.97:  # smoothing costs a Mul when it cannot be folded: demand a gain
            best = (alpha, err)
    return best[0], best[1], base
