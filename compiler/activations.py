"""Capture intermediate tensors through ONNX Runtime, in bounded memory.

Every activation session of onnxpress is a :class:`Tap`: an ONNX Runtime session on a copy
of the model whose outputs are the tensors wanted (the copy pruned to the nodes they need
when asked). ``capture`` runs the calibration batches through taps one at a time and hands
each captured array to the consumers, then drops it: memory is one batch of activations
plus the accumulators, never the whole calibration set. ``chunk`` bounds how many tensors
one session fetches per batch (each chunk costs a pass over the data); ``feeds`` adds
inputs to every batch (weights a probe model takes as graph inputs). :class:`SegmentStream`
runs a model segment by segment through the same taps.

Accumulators (``Gram``, ``CrossStats``, ``ChannelStats``, ...) see token rows: the
tensor flattened to [tokens, channels] (channels = last axis) with padded tokens removed
when its leading dims are [batch, seq] (or [batch*seq]) and the batch has an attention mask.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple, Protocol

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from onnxpress.calibration import CalibrationSet, Feeds
from onnxpress.editing import remove_dead_nodes
from onnxpress.errors import OnnxpressError
from onnxpress.memory import release_freed_memory
from onnxpress.model_io import SessionModel, data_folder, handed_over, session_model, weightless_proto
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
    chunk: int | None = None,
    prune: bool = False,
    feeds: Feeds | None = None,
    mask_padding: bool = True,
    threads: int | None = None,
    desc: str = "capturing activations",
) -> None:
    """Run ``calib`` through ``model`` and feed the named intermediate tensors to ``consumer``.

    ``consumer`` is either a callable ``(name, array, feeds)`` that gets each raw array,
    or one or more accumulators that get padding-free token rows. ``tensor_names`` may be
    None when accumulators are given (their ``names`` are captured).

    ``chunk``: at most this many tensors per session, one session and one pass over ``calib``
    per chunk (an accumulator's tensors stay in one chunk), to bound the memory one batch's
    outputs take. ``prune``: run a copy cut down to the nodes the tensors need (ORT runs every
    node otherwise). ``feeds``: inputs added to every batch, over the batch's own of the same
    name. The caller's model is not modified.
    """
    accumulators = _as_accumulators(consumer)
    names = list(dict.fromkeys(tensor_names or [n for a in accumulators or () for n in a.names]))
    if not names:
        raise OnnxpressError("no tensors to capture: name at least one intermediate tensor")
    batches = list(calib) if not isinstance(calib, CalibrationSet) else calib.batches
    parts = _chunks(names, accumulators, chunk)
    for i, (part, accs) in enumerate(parts):
        tap = Tap(model, part, prune=prune, threads=threads)
        label = desc if len(parts) == 1 else f"{desc} ({i + 1}/{len(parts)})"
        tap.stream(batches, consumer if accs is None else accs, feeds=feeds, mask_padding=mask_padding,
                   desc=label)
        del tap  # one session alive at a time


def _as_accumulators(consumer) -> list[Accumulator] | None:
    if isinstance(consumer, Sequence):
        return list(consumer)
    if hasattr(consumer, "update") and hasattr(consumer, "names"):
        return [consumer]
    if callable(consumer):
        return None
    raise TypeError("consumer must be a callable (name, array, feeds) or accumulator(s) with names/update")


def _chunks(names: list[str], accumulators: list[Accumulator] | None, chunk: int | None
            ) -> list[tuple[list[str], list[Accumulator] | None]]:
    """The tensors fetched together, with the accumulators they feed (None: the raw consumer)."""
    if not chunk or len(names) <= chunk:
        return [(names, accumulators)]
    if accumulators is None:
        return [(names[i : i + chunk], None) for i in range(0, len(names), chunk)]
    parts: list[tuple[list[str], list[Accumulator] | None]] = []
    part: dict[str, None] = {}
    accs: list[Accumulator] = []
    for acc in accumulators:
        grown = {**part, **dict.fromkeys(acc.names)}
        if accs and len(grown) > chunk:
            parts.append((list(part), accs))
            grown, accs = dict.fromkeys(acc.names), []
        part = grown
        accs.append(acc)
    parts.append((list(part), accs))
    return parts


class Tap:
    """An ONNX Runtime session returning the tensors ``names`` of ``model``.

    Built on a copy of ``model`` with those tensors as graph outputs (its own outputs kept,
    or, with ``prune``, replaced and the nodes nothing then needs removed), or on a model
    already serialised with them as outputs (``SegmentStream``'s segments, the low-rank
    probe model). Callers running the same tensors many times keep one tap."""

    def __init__(self, model: ir.Model | SessionModel | bytes, names: Sequence[str], *, prune: bool = False,
                 threads: int | None = None):
        self.names = list(dict.fromkeys(names))
        source = with_outputs(model, self.names, prune=prune) if isinstance(model, ir.Model) else model
        self.session = make_session(source, threads=threads)

    def run(self, feeds: Feeds) -> dict[str, np.ndarray]:
        """The tensors on one batch (``feeds`` may name inputs the session does not take)."""
        arrays = self.session.run(self.names, session_feeds(self.session, feeds))
        return dict(zip(self.names, arrays, strict=True))

    def stream(
        self,
        batches: Iterable[Feeds],
        consumer: RawConsumer | Accumulator | Sequence[Accumulator],
        *,
        feeds: Feeds | None = None,
        mask_padding: bool = True,
        desc: str | None = "capturing activations",
    ) -> None:
        """Every batch through the session (``feeds`` added to each), its tensors handed to
        ``consumer`` (raw, or as token rows to accumulators) and dropped before the next.
        ``desc`` labels the progress bar (None: no bar)."""
        accumulators = _as_accumulators(consumer)
        batches = list(batches)
        for batch in tqdm(batches, desc=desc, disable=desc is None or not progress_enabled(), leave=False):
            arrays = self.run({**batch, **feeds} if feeds else batch)
            if accumulators is None:
                for name in self.names:
                    consumer(name, arrays.pop(name), batch)
                continue
            mask = batch.get("attention_mask") if mask_padding else None
            uses = Counter(n for acc in accumulators for n in acc.names)
            rows: dict[str, np.ndarray] = {}
            for acc in accumulators:
                for n in acc.names:
                    if n not in rows:
                        rows[n] = token_rows(arrays.pop(n), mask)
                acc.update({n: rows[n] for n in acc.names})
                for n in acc.names:  # bounded memory: a tensor's rows go once its last reader is done
                    uses[n] -= 1
                    if not uses[n]:
                        del rows[n]
            del arrays


def with_outputs(model: ir.Model, names: Sequence[str], *, prune: bool = False) -> SessionModel:
    """A copy of ``model`` for a session, whose outputs are its own plus ``names`` (with
    ``prune``: ``names`` only, and only the nodes they need); the caller's model is untouched."""
    copy = model.clone()  # weights shared, not copied
    values = _values_by_name(copy)
    for name in names:
        if name not in values:
            raise OnnxpressError(
                f"tensor {name!r} is not in the model: pick a node output or graph input name"
            )
    if prune:
        copy.graph.outputs.clear()
    for name in names:
        value = values[name]
        if value.is_graph_output():
            continue
        if value.dtype is None:
            value.shape = None  # untyped: ORT infers the type (a shape alone would not serialise)
        copy.graph.outputs.append(value)
    if prune:
        remove_dead_nodes(copy)
    return session_model(copy)


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


class Gram:
    """Streaming second moments of one tensor's token rows, accumulated in float64:
    ``xtx`` = X^T X, ``sum`` = the column sums, ``count`` = the rows (tokens).

    With reference rows (the same tensor of the original model on the same tokens, X_ref)
    it also holds ``cross`` = X^T X_ref, ``xtx_ref`` and ``sum_ref``; without them those are
    X's own arrays (X_ref = X). Per-batch products are taken in ``products`` (float32: BLAS
    sgemm, half the time of float64, and a batch of a few thousand rows is far from where
    float32 sums lose digits). As an accumulator for :func:`capture`, ``Gram(name)`` takes
    the rows of ``name``.
    """

    def __init__(self, name: str | None = None, dim: int | None = None, *, products: type = np.float64):
        self.names = (name,) if name is not None else ()
        self.name = name
        self.products = products
        self.xtx: np.ndarray | None = None
        self.sum: np.ndarray | None = None
        self.count = 0
        self._ref: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # cross, xtx_ref, sum_ref
        if dim is not None:
            self._allocate(dim)

    @classmethod
    def of(cls, x: np.ndarray, x_ref: np.ndarray | None = None) -> Gram:
        gram = cls(dim=x.shape[-1])
        gram.add(x, x_ref)
        return gram

    def _allocate(self, dim: int) -> None:
        self.xtx, self.sum = np.zeros((dim, dim)), np.zeros(dim)

    def update(self, rows: dict[str, np.ndarray]) -> None:
        self.add(rows[self.name])

    def add(self, x: np.ndarray, x_ref: np.ndarray | None = None) -> None:
        """Accumulate token rows ``x`` [tokens, dim] (and the reference's rows of the same tokens)."""
        x = np.asarray(x).reshape(-1, np.shape(x)[-1]).astype(self.products, copy=False)
        if self.xtx is None:
            self._allocate(x.shape[1])
        self.xtx += x.T @ x
        self.sum += x.sum(0, dtype=np.float64)
        self.count += x.shape[0]
        if x_ref is not None:
            ref = np.asarray(x_ref).reshape(x.shape).astype(self.products, copy=False)
            if self._ref is None:
                d = x.shape[1]
                self._ref = (np.zeros((d, d)), np.zeros((d, d)), np.zeros(d))
            cross, xtx_ref, sum_ref = self._ref
            cross += x.T @ ref
            xtx_ref += ref.T @ ref
            sum_ref += ref.sum(0, dtype=np.float64)

    def __add__(self, other: Gram) -> Gram:
        """The moments of both sets of rows (each with or each without reference rows)."""
        if (self._ref is None) != (other._ref is None):
            raise ValueError("cannot add a Gram with reference rows to one without")
        total = Gram(self.name, products=self.products)
        total.xtx, total.sum, total.count = self.xtx + other.xtx, self.sum + other.sum, self.count + other.count
        if self._ref is not None:
            total._ref = tuple(a + b for a, b in zip(self._ref, other._ref, strict=True))
        return total

    @property
    def has_reference(self) -> bool:
        return self._ref is not None

    @property
    def cross(self) -> np.ndarray:
        return self._ref[0] if self._ref is not None else self.xtx

    @property
    def xtx_ref(self) -> np.ndarray:
        return self._ref[1] if self._ref is not None else self.xtx

    @property
    def sum_ref(self) -> np.ndarray:
        return self._ref[2] if self._ref is not None else self.sum

    @property
    def dim(self) -> int:
        return self.xtx.shape[0]

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.count, 1)

    @property
    def mean_ref(self) -> np.ndarray:
        return self.sum_ref / max(self.count, 1)

    def scaled(self, s: np.ndarray) -> Gram:
        """The Gram of the same rows with channel j divided by ``s[j]``, exactly, without the
        data (no reference rows)."""
        if self.has_reference:
            raise ValueError("scaled: a Gram with reference rows has no single scaling")
        s64 = np.asarray(s, dtype=np.float64)
        out = Gram(self.name, products=self.products)
        out.xtx, out.sum, out.count = self.xtx / np.outer(s64, s64), self.sum / s64, self.count
        return out

    def covariance(self) -> np.ndarray:
        """Centered covariance (population, divides by the token count)."""
        mean = self.mean
        return self.xtx / max(self.count, 1) - np.outer(mean, mean)

    def matrix(self) -> np.ndarray:
        """The (d+1) x (d+1) Gram of [X 1] (least-squares fits with a bias)."""
        d = self.dim
        g = np.empty((d + 1, d + 1))
        g[:d, :d] = self.xtx
        g[:d, d] = g[d, :d] = self.sum
        g[d, d] = self.count
        return 0.5 * (g + g.T)


class Energy:
    """The squared norm of a tensor over real tokens."""

    def __init__(self, name: str):
        self.names = (name,)
        self.total = 0.0

    def update(self, rows: dict[str, np.ndarray]) -> None:
        r = rows[self.names[0]].astype(np.float64)
        self.total += float(np.einsum("ij,ij->", r, r))


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


# ---- sequential fitting: statistics of the compressed and the original model's inputs ----


class SegmentStream:
    """One model run segment by segment over the calibration batches, for sequential fitting.

    The graph (topologically ordered) is cut just before a node; the values made before the
    cut and used after it (the residual stream, the attention mask, ...) are kept per batch,
    and the next segment runs from them: a whole sequential fit costs about one forward pass
    instead of one model prefix per group. Nodes after the cut may be rewritten in between.
    Values made from constants alone (a tied LM head's transposed embedding table) are the same
    in every batch and kept once."""

    def __init__(self, model: ir.Model, batches: list[dict[str, np.ndarray]], types: dict[str, int],
                 threads: int | None):
        self.model, self.batches, self.types, self.threads = model, batches, types, threads
        self.done: set[int] = set()  # ids of the nodes before the cut (never rewritten later)
        self.kept: list[dict[str, np.ndarray]] = [{} for _ in batches]  # live values at the cut
        self.shared: dict[str, np.ndarray] = {}  # live values at the cut made from constants alone

    def advance(self, first: ir.Node, wanted: list[str]) -> list[list[np.ndarray]]:
        """Move the cut to just before ``first``; returns the ``wanted`` tensors per batch."""
        nodes = list(self.model.graph)
        stop = nodes.index(first)
        constant = _made_from_constants(nodes[:stop])
        deferred = _read_later_only(nodes, stop, constant, set(wanted))
        segment = [n for n in nodes[:stop] if id(n) not in self.done and id(n) not in deferred]
        made = {v.name for n in nodes[:stop] if id(n) not in deferred for v in n.outputs}
        live = {v.name for n in nodes[stop:] for v in n.inputs if v is not None and v.name in made}
        carried = set(self.kept[0]) | set(self.shared)
        outputs = sorted((live | set(wanted)) - carried - {v.name for v in self.model.graph.inputs})
        tap = None
        if outputs:
            tap = Tap(self._segment_proto(segment, carried, outputs), outputs, threads=self.threads)
        results = []
        for b, feeds in enumerate(self.batches):
            values = {**feeds, **self.shared, **self.kept[b]}
            if tap is not None:
                values.update(tap.run(values))
            # copies: an array ONNX Runtime returned keeps its session's memory arena alive
            self.kept[b] = {k: np.array(values[k]) for k in live - constant}
            if b == 0:
                self.shared = {k: np.array(values[k]) for k in live & constant}
            results.append([np.array(values[n]) for n in wanted])
        self.done.update(id(n) for n in nodes[:stop] if id(n) not in deferred)
        tap = values = None
        release_freed_memory()  # the segment's session, before the caller fits on the results
        return results

    def _type(self, name: str) -> int:
        """A segment input's element type: known from the graph, else from the array carried."""
        if name in self.types:
            return self.types[name]
        from onnx import helper

        return helper.np_dtype_to_tensor_dtype({**self.shared, **self.kept[0]}[name].dtype)

    def _segment_proto(self, segment: list[ir.Node], carried: set[str], outputs: list[str]) -> SessionModel:
        from onnx import helper

        graph_inputs = {v.name for v in self.model.graph.inputs}
        produced = {v.name for node in segment for v in node.outputs}
        folder = data_folder(self.model)
        inputs, inits, seen, weights = [], [], set(), {}
        for v in (v for node in segment for v in node.inputs):
            if v is None or v.name in produced or v.name in seen:
                continue
            seen.add(v.name)
            if v.name in graph_inputs:  # with its declared shape: a pruned KV cache's feeds are fitted to it
                inputs.append(ir.serde.serialize_value(v))
            elif v.name in carried:
                inputs.append(helper.make_tensor_value_info(v.name, self._type(v.name), None))
            elif v.const_value is not None:
                tensor = v.const_value
                if isinstance(tensor, ir.ExternalTensor) and str(tensor.base_dir) != folder:  # spilled
                    tensor = handed_over(tensor, v.name, weights)
                inits.append(ir.serde.serialize_tensor(tensor))
                inits[-1].name = v.name
        # an output of an op ONNX's shape inference does not know, made by a rewrite: ORT infers it
        outs = [helper.make_tensor_value_info(n, self.types[n], None) if n in self.types
                else helper.make_empty_tensor_value_info(n) for n in outputs]
        graph = helper.make_graph([ir.serde.serialize_node(n) for n in segment], "segment", inputs, outs, inits)
        opsets = [helper.make_opsetid(d, v) for d, v in self.model.opset_imports.items()]
        proto = helper.make_model(graph, opset_imports=opsets, ir_version=self.model.ir_version).SerializeToString()
        # weights still in the input's data file stay references to it, mapped by ONNX Runtime
        return SessionModel(proto, weights, data_folder=folder)


def _read_later_only(nodes: list[ir.Node], stop: int, constant: set[str], wanted: set[str]) -> set[int]:
    """Ids of the nodes before ``stop`` that make values from constants alone read only by nodes
    from ``stop`` on (or by other such nodes): a segment leaves them to the segment that reads
    them, which a rewrite may remove first (a tied LM head's transposed embedding table)."""
    position = {id(node): i for i, node in enumerate(nodes)}  # users in subgraphs have none
    deferred: set[int] = set()
    for node in reversed(nodes[:stop]):
        if all(v.name in constant and v.name not in wanted and not v.is_graph_output()
               and all(id(user) in deferred or position.get(id(user), -1) >= stop for user, _ in v.uses())
               for v in node.outputs):
            deferred.add(id(node))
    return deferred


def _made_from_constants(nodes: list[ir.Node]) -> set[str]:
    """Names of the values ``nodes`` (in graph order) make from initializers and constants alone."""
    constant: set[str] = set()
    for node in nodes:
        if all(v is None or v.name in constant or (v.const_value is not None and not v.is_graph_input())
               for v in node.inputs):
            constant.update(v.name for v in node.outputs)
    return constant


def value_types(model: ir.Model) -> dict[str, int]:
    """Element type (TensorProto enum) of every named value, by ONNX shape inference where
    the graph does not record it."""
    import onnx

    types = {v.name: int(v.dtype) for v in model.graph.inputs if v.dtype is not None}
    missing = [v for node in model.graph for v in node.outputs if v.dtype is None]
    if missing:
        inferred = onnx.shape_inference.infer_shapes(weightless_proto(model)).graph
        for info in list(inferred.value_info) + list(inferred.output):
            if info.type.tensor_type.elem_type:
                types[info.name] = info.type.tensor_type.elem_type
    types.update({v.name: int(v.dtype) for node in model.graph for v in node.outputs if v.dtype is not None})
    return types


class Captured(NamedTuple):
    grams: dict[str, Gram]
    energy: dict[str, float]


def capture_grams(
    model: ir.Model,
    batches: Iterable[Feeds],
    grams: Sequence[str],
    energies: Sequence[str] = (),
    *,
    products: type = np.float64,
    prune: bool = False,
    threads: int | None = None,
    desc: str = "capturing statistics",
) -> Captured:
    """One streaming pass: the Gram of each tensor in ``grams`` (per-batch products in
    ``products``, see :class:`Gram`) and the squared norm of each in ``energies``, over real
    (unpadded) tokens; ``prune`` runs only the nodes those tensors need."""
    gram_accs = {n: Gram(n, products=products) for n in dict.fromkeys(grams)}
    energy_accs = {n: Energy(n) for n in dict.fromkeys(energies)}
    accs = [*gram_accs.values(), *energy_accs.values()]
    if accs:
        capture(model, None, list(batches), accs, prune=prune, threads=threads, desc=desc)
    return Captured({n: a for n, a in gram_accs.items() if a.xtx is not None},
                    {n: a.total for n, a in energy_accs.items()})


def probe_shapes(model: ir.Model, names: Sequence[str], feeds: Feeds, *, threads: int | None = None
                 ) -> dict[str, tuple[int, ...]]:
    """Run-time shapes of the named tensors on one batch (facts static shapes do not give)."""
    shapes: dict[str, tuple[int, ...]] = {}
    if names:
        capture(model, names, [feeds], lambda name, array, _: shapes.__setitem__(name, array.shape),
                threads=threads, desc="probing shapes")
    return shapes
