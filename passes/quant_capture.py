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
from onnxpress.passes.quant_calibrate import StreamingHistogram
from onnxpress.runtime import make_session


@dataclass
class TensorStats:
    channels: int
    gram: np.ndarray | None = None  # float64 [K, K]
    absmax: np.ndarray | None = None  # float32 [K]
    hist: StreamingHistogram = field(default_factory=StreamingHistogram)
    sample: np.ndarray | None = None  # float32 [rows, K]
    rows: int = 0


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
            st = self.stats[name] = TensorStats(channels=k, absmax=np.zeros(k, np.float32))
            if name in self.gram_names:
                st.gram = np.zeros((k, k), np.float64)
        if not len(rows):
            return
        np.maximum(st.absmax, np.abs(rows).max(axis=0), out=st.absmax)
        st.hist.update(rows)
        if st.gram is not None:
            st.gram += rows.T.astype(np.float64) @ rows.astype(np.float64)
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
    chunk: int = 48,
) -> dict[str, TensorStats]:
    """Stream ``batches`` through ``model`` and collect :class:`TensorStats` for ``names``.

    Tensors are fetched ``chunk`` at a time (one session per chunk) to bound the memory a
    batch's worth of extra outputs takes on large models."""
    collector = StatsCollector(names, gram_names, sample_rows, seed)
    base = model_proto(model)
    graph_inputs = {i.name for i in base.graph.input}
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
            arrays = session.run(wanted, {k: v for k, v in feeds.items() if k in graph_inputs})
            mask = feeds.get("attention_mask")
            for name, arr in zip(wanted, arrays, strict=True):
                if mask is not None and arr.ndim == 3 and mask.shape[1] != arr.shape[1]:
                    mask_rows = mask[:, -arr.shape[1] :]  # decoders with past: mask covers past + new
                else:
                    mask_rows = mask
                collector.update(name, arr, mask_rows)
        del session
    return collector.stats
