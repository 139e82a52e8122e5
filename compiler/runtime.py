"""ONNX Runtime sessions: one place that creates them, runs batches through them and times them."""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxpress.errors import OnnxpressError
from onnxpress.memory import release_freed_memory
from onnxpress.model_io import SessionModel, session_model

Feeds = Mapping[str, np.ndarray]
ModelLike = str | os.PathLike | ir.Model | ort.InferenceSession


def session_options(threads: int | None = None, *, optimize: bool = True) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or int(os.environ.get("ONNXPRESS_THREADS", "0"))
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # Idle pool threads stop spinning when a run ends: a process here holds several sessions
    # (reference and candidate, or variants timed in turn), and one session's spinning threads
    # would take the cores of the next (timed in turn with spinning, 2 threads barely beat 1).
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return opts


def make_session(
    model: ir.Model | SessionModel | str | os.PathLike | bytes,
    *,
    threads: int | None = None,
    optimize: bool = True,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    options: ort.SessionOptions | None = None,
) -> ort.InferenceSession:
    """A session for an in-memory model (of any size), serialised bytes or a file; registers
    onnxpress's operator library when the model uses the ``onnxpress`` domain. ``options``
    are changed in place when the model has weights kept out of its protobuf."""
    release_freed_memory()  # what the sessions before this one left in the C heap
    uses_ops = _uses_onnxpress_ops(model)
    if isinstance(model, ir.Model):
        model = session_model(model)
    weights, large, folder = {}, False, None
    if isinstance(model, SessionModel):
        model, weights, large, folder = model.proto, model.weights, model.over_limit, model.data_folder
    source: bytes | str = model if isinstance(model, bytes) else str(model)
    opts = options or session_options(threads, optimize=optimize)
    if large:  # MatMul kernels would keep a repacked copy of every weight: a second model in memory
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if folder is not None:  # where a model from bytes finds its external data files
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    # OrtValues over the arrays' memory, not copies: the session keeps both alive
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in weights.values()]
    if weights:
        opts.add_external_initializers(list(weights), values)
    if uses_ops:
        from onnxpress import runtime_ops

        opts = runtime_ops.session_options_for(source, opts)
    try:
        session = ort.InferenceSession(source, sess_options=opts, providers=list(providers))
    except Exception as exc:  # ORT raises several types; make it one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxpressError(f"ONNX Runtime cannot load the model: {first}") from None
    session.onnxpress_weights = (weights, values)
    return session


def as_session(model: ModelLike, threads: int | None = None) -> ort.InferenceSession:
    """A session passes through; anything else gets one from ``make_session``."""
    return model if isinstance(model, ort.InferenceSession) else make_session(model, threads=threads)


def _uses_onnxpress_ops(model: ir.Model | SessionModel | str | os.PathLike | bytes) -> bool:
    if isinstance(model, ir.Model):
        return any(node.domain == "onnxpress" for node in ir.traversal.RecursiveGraphIterator(model.graph))
    if isinstance(model, SessionModel):
        model = model.proto
    if isinstance(model, str | os.PathLike) and not Path(model).exists():
        return False
    from onnxpress import runtime_ops

    return runtime_ops.uses_onnxpress_ops(model)


def session_feeds(session: ort.InferenceSession, feeds: Feeds) -> dict[str, np.ndarray]:
    """The feeds ``session`` takes, with empty inputs (a zero-length KV cache) reshaped to the
    session's static dims: after head pruning the cache has fewer heads, and the same
    calibration feeds must run through the model before and after."""
    out = {}
    for spec in session.get_inputs():
        arr = feeds.get(spec.name)
        if arr is None:
            continue
        if arr.size == 0 and len(spec.shape) == arr.ndim:
            dims = [d if isinstance(d, int) else a for d, a in zip(spec.shape, arr.shape, strict=True)]
            if tuple(dims) != arr.shape:
                arr = np.zeros(dims, dtype=arr.dtype)
        out[spec.name] = arr
    return out


def iter_batches(
    session: ort.InferenceSession, batches: Iterable[Feeds], outputs: Sequence[str] | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Run the batches one at a time as they are asked for: one {output name: array} dict each.

    A batch's arrays live in the session's memory arena: a caller that lets go of one before asking
    for the next (``del`` at the end of its loop) lets the next run reuse that memory."""
    names = list(outputs) if outputs is not None else [o.name for o in session.get_outputs()]
    for feeds in batches:
        out = dict(zip(names, session.run(names, session_feeds(session, feeds)), strict=True))
        yield out
        del out


def run_batches(
    session: ort.InferenceSession, batches: Iterable[Feeds], outputs: Sequence[str] | None = None
) -> list[dict[str, np.ndarray]]:
    """Run every batch; returns one {output name: array} dict per batch."""
    return list(iter_batches(session, batches, outputs))


def time_alternating(
    runs: Mapping[str, Callable[[], Any]], *, repeats: int = 10, warmup: int = 2, min_seconds: float = 0.0
) -> dict[str, float]:
    """Median seconds per call of each callable, measured round-robin, so that all of them
    share the machine's drift (other jobs, clock changes) and their ratios stay meaningful.
    Each round takes the callables in a new random order (seeded): in a fixed order a model
    would always run in the caches its predecessor left, a bias no number of rounds removes."""
    order = list(runs)
    rng = random.Random(0)
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    start = time.perf_counter()
    while True:
        rng.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            runs[name]()
            samples[name].append(time.perf_counter() - t0)
        done = len(next(iter(samples.values())))
        if done >= repeats and time.perf_counter() - start >= min_seconds:
            break
    return {name: statistics.median(s) for name, s in samples.items()}
