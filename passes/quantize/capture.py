"""Calibration statistics of the activations that feed the quantised MatMuls.

One streaming pass through ONNX Runtime per call: the wanted tensors are added as
extra graph outputs of a serialised copy of the model and every calibration batch
updates, per tensor, what the quantiser needs and nothing more:

- per-channel |x| maxima (SmoothQuant), overall min/max and a histogram (ranges),
- ``X^T X`` (GPTQ's Hessian), only for the tensors asked for,
- a bounded random sample of rows (to score range candidates on real data).

Padding tokens are left out (rows where ``attention_mask`` is 0), so variable-length
calibration batches padded to a common length do not skew the ranges towards 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from onnxpress.model_io import model_proto
from onnxpress.passes.quantize.calibrate import StreamingHistogram
from onnxpress.runtime import make_session, session_feeds


@dataclass
class TensorStats:
    channels: int
    gram: np.ndarray | None = None  # float64 [K, K]
    absmax: np.ndarray | None = None  # float32 [K]
    hist: StreamingHistogram = field(default_factory=StreamingHistogram)
    sample: np.ndarray | None = None  # float32 [rows, K]
    rows: int = 0
    colmin: np.ndarray | None = None  # float32 [K]
    colmax: np.ndarray | None = None  # float32 [K]

    def scaled(self, s: np.ndarray) -> TensorStats:
        """The statistics of ``x / s`` (SmoothQuant's input), without running the model again:
        exact for the Gram, maxima, min/max and sample; the histogram is rebuilt from the
        sample with the exact min/max (static ranges should be captured again instead)."""
        s64 = s.astype(np.float64)
        out = TensorStats(channels=self.channels, rows=self.rows)
        if self.gram is not None:
            out.gram = self.gram / np.outer(s64, s64)
        out.absmax = (self.absmax / s).astype(np.float32)
        out.colmin, out.colmax = self.colmin / s, self.colmax / s
        if self.sample is not None:
            out.sample = (self.sample / s).astype(np.float32)
            out.hist.update(out.sample)
        out.hist.min, out.hist.max = float(out.colmin.min()), float(out.colmax.max())
        return out


class StatsCollector:
    def __init__(
        self, names: Sequence[str], gram_names: Sequence[str] = (), sample_rows: int = 512, seed: int = 0
    ):
        self.names = list(dict.fromkeys(names))
        self.gram_names = set(gram_names)
        self.sample_rows = sample_rows
        self.rng = np.random.default_rng(seed)
        self.stats: dict[str, TensorStats] = {}

    def update(self, name: str, x: np.ndarray, mask: np.ndarray | None) -> None:
        k = x.shape[-1]
        if mask is not None and x.ndim == 3 and mask.shape == x.shape[:2]:
            rows = x[mask.astype(bool)]
        else:
            rows = x.reshape(-1, k)
        rows = rows.astype(np.float32, copy=False)
        st = self.stats.get(name)
        if st is None:
            st = self.stats[name] = TensorStats(
                channels=k,
                absmax=np.zeros(k, np.float32),
                colmin=np.full(k, np.inf, np.float32),
                colmax=np.full(k, -np.inf, np.float32),
            )
            if name in self.gram_names:
                st.gram = np.zeros((k, k), np.float64)
        if not len(rows):
            return
        np.maximum(st.absmax, np.abs(rows).max(axis=0), out=st.absmax)
        np.minimum(st.colmin, rows.min(axis=0), out=st.colmin)
        np.maximum(st.colmax, rows.max(axis=0), out=st.colmax)
        st.hist.update(rows)
        if st.gram is not None:
            # float32 GEMM per batch (a few thousand rows: ample precision), float64 across
            # batches; the float64 GEMM was most of the capture time on a decoder
            st.gram += (rows.T @ rows).astype(np.float64)
        if self.sample_rows:
            # reservoir-ish: keep a uniform subset of at most sample_rows rows
            take = rows[self.rng.random(len(rows)) < min(1.0, 4 * self.sample_rows / max(len(rows), 1))]
            st.sample = take if st.sample is None else np.concatenate([st.sample, take])
            if len(st.sample) > self.sample_rows:
                st.sample = st.sample[self.rng.choice(len(st.sample), self.sample_rows, replace=False)]
        st.rows += len(rows)


def capture_stats(
    model: ir.Model,
    batches: Sequence[dict[str, np.ndarray]],
    names: Sequence[str],
    *,
    gram_names: Sequence[str] = (),
    sample_rows: int = 512,
    threads: int | None = None,
    seed: int = 0,
    chunk: int = 256,
) -> dict[str, TensorStats]:
    """Stream ``batches`` through ``model`` and collect :class:`TensorStats` for ``names``.

    Tensors are fetched ``chunk`` at a time (one session and one pass over the data per
    chunk) to bound the memory a batch's worth of extra outputs takes; every chunk costs a
    full model run per batch, which dominates the pass on decoders, so the default fetches
    a 30-layer decoder's ~120 MatMul inputs (~0.4 GB per 4 x 256-token batch) in one go."""
    collector = StatsCollector(names, gram_names, sample_rows, seed)
    base = model_proto(model)
    for start in range(0, len(collector.names), chunk):
        wanted = collector.names[start : start + chunk]
        proto = onnx.ModelProto()
        proto.CopyFrom(base)
        existing = {o.name for o in proto.graph.output}
        for name in wanted:
            if name not in existing:
                proto.graph.output.append(
                    onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                )
        session = make_session(proto.SerializeToString(), threads=threads)
        for feeds in batches:
            arrays = session.run(wanted, session_feeds(session, feeds))
            mask = feeds.get("attention_mask")
            for name, arr in zip(wanted, arrays, strict=True):
                if mask is not None and arr.ndim == 3 and mask.shape[1] != arr.shape[1]:
                    mask_rows = mask[:, -arr.shape[1] :]  # decoders with past: mask covers past + new
                else:
                    mask_rows = mask
                collector.update(name, arr, mask_rows)
        del session
    return collector.stats
