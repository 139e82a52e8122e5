"""Calibration statistics of the activations that feed the quantised MatMuls.

One streaming pass through :func:`onnxpress.activations.capture` per call, the tensors
fetched ``chunk`` at a time; every calibration batch updates, per tensor, what the
quantiser needs and nothing more:

- per-channel |x| maxima (SmoothQuant), overall min/max and a histogram (ranges),
- ``X^T X`` (GPTQ's Hessian, a :class:`~onnxpress.activations.Gram`), only for the tensors asked for,
- a bounded random sample of rows (to score range candidates on real data).

:class:`SequentialHessians` instead takes GPTQ's Hessians one input at a time, in graph order,
on the model as rewritten so far.

Padding tokens are left out (capture's token rows), so variable-length calibration
batches padded to a common length do not skew the ranges towards 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxpress.activations import Gram, SegmentStream, capture, token_rows, value_types
from onnxpress.passes.quantize.calibrate import StreamingHistogram


class TensorStats:
    """The quantiser's statistics of one tensor's token rows; an accumulator for ``capture``.

    Row samples draw from ``rng``, shared by the tensors of one capture so that the samples
    depend only on the seed and the order of the tensors."""

    def __init__(self, name: str, *, gram: bool = False, sample_rows: int = 512,
                 rng: np.random.Generator | None = None):
        self.names = (name,)
        self.name = name
        self.want_gram, self.sample_rows = gram, sample_rows
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.channels: int | None = None
        self.gram: Gram | None = None  # float32 products per batch, float64 sums
        self.absmax: np.ndarray | None = None  # float32 [K]
        self.colmin: np.ndarray | None = None  # float32 [K]
        self.colmax: np.ndarray | None = None  # float32 [K]
        self.hist = StreamingHistogram()
        self.sample: np.ndarray | None = None  # float32 [rows, K]
        self.rows = 0

    def update(self, rows: dict[str, np.ndarray]) -> None:
        self.add(rows[self.name])

    def add(self, rows: np.ndarray) -> None:
        """Accumulate token rows [tokens, K]."""
        rows = rows.astype(np.float32, copy=False)
        k = rows.shape[-1]
        if self.channels is None:
            self.channels = k
            self.absmax = np.zeros(k, np.float32)
            self.colmin, self.colmax = np.full(k, np.inf, np.float32), np.full(k, -np.inf, np.float32)
            if self.want_gram:
                self.gram = Gram(self.name, k, products=np.float32)
        if not len(rows):
            return
        np.maximum(self.absmax, np.abs(rows).max(axis=0), out=self.absmax)
        np.minimum(self.colmin, rows.min(axis=0), out=self.colmin)
        np.maximum(self.colmax, rows.max(axis=0), out=self.colmax)
        self.hist.update(rows)
        if self.gram is not None:
            self.gram.add(rows)
        if self.sample_rows:
            # reservoir-ish: keep a uniform subset of at most sample_rows rows
            take = rows[self.rng.random(len(rows)) < min(1.0, 4 * self.sample_rows / max(len(rows), 1))]
            self.sample = take if self.sample is None else np.concatenate([self.sample, take])
            if len(self.sample) > self.sample_rows:
                self.sample = self.sample[self.rng.choice(len(self.sample), self.sample_rows, replace=False)]
        self.rows += len(rows)

    def scaled(self, s: np.ndarray) -> TensorStats:
        """The statistics of ``x / s`` (SmoothQuant's input), without running the model again:
        exact for the Gram, maxima, min/max and sample; the histogram is rebuilt from the
        sample with the exact min/max (static ranges should be captured again instead)."""
        out = TensorStats(self.name, gram=self.want_gram, sample_rows=self.sample_rows, rng=self.rng)
        out.channels, out.rows = self.channels, self.rows
        if self.gram is not None:
            out.gram = self.gram.scaled(s)
        out.absmax = (self.absmax / s).astype(np.float32)
        out.colmin, out.colmax = self.colmin / s, self.colmax / s
        if self.sample is not None:
            out.sample = (self.sample / s).astype(np.float32)
            out.hist.update(out.sample)
        out.hist.min, out.hist.max = float(out.colmin.min()), float(out.colmax.max())
        return out


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
    rng = np.random.default_rng(seed)
    with_gram = set(gram_names)
    stats = [TensorStats(n, gram=n in with_gram, sample_rows=sample_rows, rng=rng)
             for n in dict.fromkeys(names)]
    if stats:
        capture(model, None, list(batches), stats, chunk=chunk, threads=threads,
                desc="quantize: activation statistics")
    return {st.name: st for st in stats if st.channels is not None}


class SequentialHessians:
    """GPTQ's ``X^T X`` of MatMul inputs taken in graph order, each on the model as rewritten so
    far: the MatMuls before an input are already rounded when its rows are captured, so each
    rounding also absorbs the error of those before it (GPTQ's own layer-by-layer order). The
    model runs segment by segment (:class:`~onnxpress.activations.SegmentStream`): one forward
    pass over the calibration batches in all, and one input's Hessian in memory at a time."""

    def __init__(self, model: ir.Model, batches: Sequence[dict[str, np.ndarray]], threads: int | None = None):
        batches = list(batches)
        self.stream = SegmentStream(model, batches, value_types(model), threads)
        self.masks = [b.get("attention_mask") for b in batches]
        self._held: tuple[str, np.ndarray] | None = None

    def __call__(self, name: str, first: ir.Node) -> np.ndarray:
        """The Hessian of input ``name``, whose first reader in graph order is ``first``; the nodes
        after ``first`` may be rewritten before the next call (with a later input)."""
        if self._held is not None and self._held[0] == name:
            return self._held[1]
        self._held = None  # the last input's Hessian goes before this one is built
        gram = Gram(name, products=np.float32)
        for arrays, mask in zip(self.stream.advance(first, [name]), self.masks, strict=True):
            gram.add(token_rows(arrays[0], mask))
        self._held = (name, gram.xtx)
        return gram.xtx
