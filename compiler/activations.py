"""Capture intermediate tensors through ONNX Runtime, in bounded memory.

``capture`` serialises a copy of the model with the chosen values added as graph
outputs, runs the calibration batches one at a time and hands each captured array to
the consumers, then drops it: memory is one batch of activations plus the
accumulators, never the whole calibration set.

Accumulators (``GramStats``, ``CrossStats``, ``ChannelStats``) see token rows: the
tensor flattened to [tokens, channels] (channels = last axis) with padded tokens removed
when its leading dims are [batch, seq] (or [batch*seq]) and the batch has an attention mask.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import numpy as np
import onnx
import onnx_ir as ir
from tqdm.auto import tqdm

from onnxpress.calibration import CalibrationSet, Feeds
from onnxpress.errors import OnnxpressError
from onnxpress.model_io import PROTOBUF_LIMIT, model_nbytes, model_proto
from onnxpress.runtime import make_session, session_feeds

RawConsumer = Callable[[str, np.ndarray, Feeds], None]


class Accumulator(Protocol):
    names: tuple[str, ...]  # tensors it needs from each batch

    def update(self, rows: dict[str, np.ndarray]) -> None: ...


def progress_enabled() -> bool:
    return os.environ.get("ONNXPRESS_PROGRESS", "1") != "0" and sys.stderr.isatty()


def capture(
    model: ir.Model,
    tensor_names: Sequence[str] | None,
    calib: CalibrationSet | Iterable[Feeds],
    consumer: RawConsumer | Accumulator | Sequence[Accumulator],
    *,
    mask_padding: bool = True,
    threads: int | None = None,
    desc: str = "capturing activations",
) -> None:
    """Run ``calib`` through ``model`` and feed the named intermediate tensors to ``consumer``.

    ``consumer`` is either a callable ``(name, array, feeds)`` that gets each raw array,
    or one or more accumulators that get padding-free token rows. ``tensor_names`` may be
    None when accumulators are given (their ``names`` are captured). The caller's model is
    not modified.
    """
    accumulators = _as_accumulators(consumer)
    names = list(dict.fromkeys(tensor_names or [n for a in accumulators for n in a.names]))
    if not names:
        raise OnnxpressError("no tensors to capture: name at least one intermediate tensor")
    session = make_session(with_outputs(model, names), threads=threads)
    batches = list(calib) if not isinstance(calib, CalibrationSet) else calib.batches
    for feeds in tqdm(batches, desc=desc, disable=not progress_enabled(), leave=False):
        arrays = dict(zip(names, session.run(names, session_feeds(session, feeds)), strict=True))
        if accumulators is None:
            for name in names:
                consumer(name, arrays[name], feeds)
        else:
            mask = feeds.get("attention_mask") if mask_padding else None
            rows = {name: token_rows(arr, mask) for name, arr in arrays.items()}
            for acc in accumulators:
                acc.update({n: rows[n] for n in acc.names})
        del arrays  # bounded memory: nothing from this batch outlives the loop body


def _as_accumulators(consumer) -> list[Accumulator] | None:
    if isinstance(consumer, Sequence):
        return list(consumer)
    if hasattr(consumer, "update") and hasattr(consumer, "names"):
        return [consumer]
    if callable(consumer):
        return None
    raise TypeError("consumer must be a callable (name, array, feeds) or accumulator(s) with names/update")


def with_outputs(model: ir.Model, names: Sequence[str]) -> bytes:
    """Serialised copy of ``model`` whose outputs are its own plus ``names`` (caller's model untouched)."""
    if model_nbytes(model) > PROTOBUF_LIMIT:
        raise OnnxpressError("model is over 2 GB: activation capture needs a model below the protobuf limit")
    values = _values_by_name(model)
    proto = model_proto(model)
    existing = {o.name for o in proto.graph.output}
    for name in names:
        if name not in values:
            raise OnnxpressError(
                f"tensor {name!r} is not in the model: pick a node output or graph input name"
            )
        if name in existing:
            continue
        value = values[name]
        if value.dtype is not None:
            shape = None if value.shape is None else [d if isinstance(d, int) else None for d in value.shape]
            info = onnx.helper.make_tensor_value_info(name, int(value.dtype), shape)
        else:  # ORT infers the type of an untyped graph output
            info = onnx.ValueInfoProto(name=name)
        proto.graph.output.append(info)
    return proto.SerializeToString()


def _values_by_name(model: ir.Model) -> dict[str, ir.Value]:
    values = {v.name: v for v in model.graph.inputs}
    for node in model.graph:
        values.update((v.name, v) for v in node.outputs if v.name)
    return values


def token_rows(array: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """[tokens, channels] view of ``array``; drops padded tokens when the leading dims are
    [batch, seq] or [batch*seq] and match ``mask`` (the attention mask)."""
    if array.ndim == 0:
        return array.reshape(1, 1)
    channels = array.shape[-1] if array.ndim > 1 else 1
    if mask is not None and array.ndim >= 2:
        seq_mask = mask[:, -array.shape[1] :] if array.ndim >= 3 else mask  # KV prefix is not in the tensor
        keep = seq_mask.astype(bool)
        if array.ndim >= 3 and array.shape[:2] == keep.shape:
            return array[keep].reshape(-1, channels)
        if array.ndim == 2 and array.shape[0] == keep.size:
            return array[keep.reshape(-1)]
    return array.reshape(-1, channels)


# ---- accumulators ----------------------------------------------------------------------


class GramStats:
    """Streaming X^T X over tokens (float64), with the token count and column sums."""

    def __init__(self, name: str):
        self.names = (name,)
        self.name = name
        self.xtx: np.ndarray | None = None
        self.sum: np.ndarray | None = None
        self.count = 0

    def update(self, rows: dict[str, np.ndarray]) -> None:
        x = rows[self.name].astype(np.float64)
        if self.xtx is None:
            self.xtx = np.zeros((x.shape[1], x.shape[1]))
            self.sum = np.zeros(x.shape[1])
        self.xtx += x.T @ x
        self.sum += x.sum(0)
        self.count += x.shape[0]

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.count, 1)

    def covariance(self) -> np.ndarray:
        """Centered covariance (population, divides by the token count)."""
        mean = self.mean
        return self.xtx / max(self.count, 1) - np.outer(mean, mean)


class CrossStats:
    """Streaming X^T X, X^T Y and the sums of X and Y for paired tensors (e.g. a layer's in/out)."""

    def __init__(self, x_name: str, y_name: str):
        self.names = (x_name, y_name)
        self.x_name, self.y_name = x_name, y_name
        self.xtx = self.xty = self.x_sum = self.y_sum = None
        self.count = 0

    def update(self, rows: dict[str, np.ndarray]) -> None:
        x = rows[self.x_name].astype(np.float64)
        y = rows[self.y_name].astype(np.float64)
        if x.shape[0] != y.shape[0]:
            raise OnnxpressError(
                f"{self.x_name!r} has {x.shape[0]} token rows but {self.y_name!r} has {y.shape[0]}: "
                "pair tensors of the same tokens"
            )
        if self.xtx is None:
            self.xtx, self.xty = np.zeros((x.shape[1],) * 2), np.zeros((x.shape[1], y.shape[1]))
            self.x_sum, self.y_sum = np.zeros(x.shape[1]), np.zeros(y.shape[1])
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.x_sum += x.sum(0)
        self.y_sum += y.sum(0)
        self.count += x.shape[0]


class ChannelStats:
    """Per-channel min/max/absmax/mean/mean-square, and a histogram of |x| over the whole tensor.

    The histogram has ``bins`` equal bins on [0, range); when a batch exceeds the range it
    doubles (merging bin pairs), so the counts stay exact without knowing the range up front.
    """

    def __init__(self, name: str, bins: int = 2048):
        if bins % 2:
            raise ValueError("bins must be even (the range doubles by merging bin pairs)")
        self.names = (name,)
        self.name = name
        self.bins = bins
        self.count = 0
        self.min = self.max = self.sum = self.sq_sum = None
        self.hist = np.zeros(bins, dtype=np.int64)
        self.hist_range = 0.0

    def update(self, rows: dict[str, np.ndarray]) -> None:
        x = rows[self.name]
        if x.shape[0] == 0:
            return
        x64 = x.astype(np.float64)
        if self.min is None:
            self.min, self.max = x.min(0).astype(np.float64), x.max(0).astype(np.float64)
            self.sum, self.sq_sum = np.zeros(x.shape[1]), np.zeros(x.shape[1])
        np.minimum(self.min, x.min(0), out=self.min)
        np.maximum(self.max, x.max(0), out=self.max)
        self.sum += x64.sum(0)
        self.sq_sum += (x64 * x64).sum(0)
        self.count += x.shape[0]
        self._add_histogram(np.abs(x64).ravel())

    def _add_histogram(self, values: np.ndarray) -> None:
        top = float(values.max())
        if self.hist_range == 0.0:
            self.hist_range = top if top > 0 else 1.0
        while top > self.hist_range:
            self.hist = np.concatenate([self.hist.reshape(-1, 2).sum(1), np.zeros(self.bins // 2, np.int64)])
            self.hist_range *= 2
        idx = np.minimum((values * (self.bins / self.hist_range)).astype(np.int64), self.bins - 1)
        self.hist += np.bincount(idx, minlength=self.bins)

    @property
    def absmax(self) -> np.ndarray:
        return np.maximum(np.abs(self.min), np.abs(self.max))

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.count, 1)

    @property
    def mean_square(self) -> np.ndarray:
        return self.sq_sum / max(self.count, 1)

    @property
    def bin_edges(self) -> np.ndarray:
        return np.linspace(0.0, self.hist_range, self.bins + 1)

    def percentile(self, q: float) -> float:
        """|x| below which ``q`` percent of all values lie (upper edge of the bin reaching it)."""
        cdf = np.cumsum(self.hist)
        if cdf[-1] == 0:
            return 0.0
        idx = int(np.searchsorted(cdf, cdf[-1] * q / 100.0))
        return float(self.bin_edges[min(idx, self.bins - 1) + 1])
