"""Output loss of a model with some weight matrices replaced by trial values, for allocating a
compression budget by what the model's outputs feel rather than by a per-matrix proxy.

One ORT session serves every probe: the selected matrices compute ``x @ A @ B + b`` with
A, B, b graph inputs, fed the original weight (as ``W @ I`` or ``I @ W``) or a trial (low-rank
factors; a pruned and refitted weight beside the identity).

The loss is the one the compile reports and the automatic search bounds: on encoders fed an
attention mask, 1 - mean cosine of the mask-pooled embeddings
(:class:`onnxpress.fidelity.FidelityMeter`); otherwise the outputs' squared error relative to
their energy. On MiniLM the two allocated alike (33% of heads: the same heads; BBC News cosine
with 25% of FFN neurons 0.952 against 0.954 for the squared error of the token states, with 20%
low-rank 0.936 against 0.935), so the loss the budget names is the one spent.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np
import onnx_ir as ir

from onnxpress.activations import Tap
from onnxpress.editing import GraphEditor, split_matrix
from onnxpress.fidelity import FidelityMeter, model_kind
from onnxpress.model_io import SessionModel, session_model

# every probe is a forward pass, so (units x layers) bounds the probes' cost. Low-rank's 7 roles:
# MiniLM's 6 layers get a unit per (layer, role), SmolLM2's 30 one per role over all layers (its
# probes take ~5x longer); pruning's one role: MiniLM a unit per layer, SmolLM2 buckets of 5 layers
UNIT_LAYERS = 216


def units_of(matrices: list) -> list[list[int]]:
    """Indices of ``matrices`` grouped by (role, bucket of consecutive layers), with as many
    buckets as UNIT_LAYERS allows (at least one); matrices without a layer are their own unit."""
    layers = sorted({m.layer for m in matrices if m.layer is not None})
    roles = {m.key.split(".", 1)[-1] for m in matrices if m.layer is not None}
    buckets = max(1, min(len(layers), UNIT_LAYERS // max(len(layers) * len(roles), 1)))
    per_bucket = -(-len(layers) // buckets) if layers else 1  # ceil
    bucket = {layer: i // per_bucket for i, layer in enumerate(layers)}
    groups: dict[object, list[int]] = defaultdict(list)
    for i, m in enumerate(matrices):
        key = (bucket[m.layer], m.key.split(".", 1)[-1]) if m.layer is not None else m.key
        groups[key].append(i)
    return list(groups.values())


def first_samples(batches: list[dict[str, np.ndarray]], n: int) -> list[dict[str, np.ndarray]]:
    """The first ``n`` sequences of the calibration batches (every feed's axis 0 is the batch)."""
    out = []
    for feeds in batches:
        if n <= 0:
            break
        rows = min(n, len(next(iter(feeds.values()))))
        out.append({k: a[:rows] for k, a in feeds.items()})
        n -= rows
    return out


def probe_model(model: ir.Model, matrices: list) -> tuple[SessionModel, list[tuple[str, str, str]]]:
    """A copy of ``model`` in which matrix i computes ``x @ A_i @ B_i + b_i`` from graph inputs;
    returns that model for a session and the (A, B, b) input names of each matrix."""
    copy = model.clone()
    nodes = {id(a): b for a, b in zip(model.graph, copy.graph, strict=True)}
    values = {v.name: v for node in copy.graph for v in node.outputs}
    values.update({v.name: v for v in copy.graph.inputs})
    values.update(copy.graph.initializers)
    editor = GraphEditor(copy)
    names = []
    for i, m in enumerate(matrices):
        trio = [editor.add_input(f"probe_{tag}{i}", m.dtype, shape)
                for tag, shape in (("A", [m.d_in, f"probe_r{i}"]), ("B", [f"probe_r{i}", m.d_out]), ("b", [m.d_out]))]
        moved = dataclasses.replace(
            m, node=nodes[id(m.node)], input=values[m.input.name],
            bias_node=nodes[id(m.bias_node)] if m.bias_node is not None else None,
            bias_value=values[m.bias_value.name] if m.bias_value is not None else None)
        split_matrix(editor, moved, *trio)
        names.append(tuple(v.name for v in trio))
    return session_model(copy), names


class _SquaredError:
    """Accumulator: squared distance of the outputs' token rows to ``reference`` (rows per
    batch, in batch order), summed over batches."""

    def __init__(self, names: list[str], reference: list[list[np.ndarray]]):
        self.names, self.reference = tuple(names), reference
        self.total, self._batch = 0.0, 0

    def update(self, rows: dict[str, np.ndarray]) -> None:
        ref = self.reference[self._batch]
        self._batch += 1
        self.total += sum(float(np.sum((rows[n].astype(np.float64) - r) ** 2))
                          for n, r in zip(self.names, ref, strict=True))


class _Rows:
    """Accumulator: every batch's output rows (float64), the probes' reference."""

    def __init__(self, names: list[str]):
        self.names, self.batches = tuple(names), []

    def update(self, rows: dict[str, np.ndarray]) -> None:
        self.batches.append([rows[n].astype(np.float64) for n in self.names])


class Prober:
    """Output loss of the model with some matrices replaced by trial factors."""

    def __init__(self, model: ir.Model, matrices: list, batches: list[dict], outputs: list[str],
                 threads: int | None):
        proto, self.names = probe_model(model, matrices)
        self.tap = Tap(proto, outputs, threads=threads)
        self.batches, self.outputs = batches, outputs
        self.base = {}  # feeds that keep every matrix as it is
        for m, (a, b, c) in zip(matrices, self.names, strict=True):
            dt = m.dtype.numpy()
            eye = np.eye(min(m.d_in, m.d_out), dtype=dt)  # the cheaper side carries the identity
            w = m.weight.astype(dt)
            self.base[a], self.base[b] = (eye, w) if m.d_in <= m.d_out else (w, eye)
            self.base[c] = (m.bias if m.bias is not None else np.zeros(m.d_out)).astype(dt)
        self.meter = None
        if model_kind(model) == "encoder" and batches and all("attention_mask" in b for b in batches):
            self.meter = FidelityMeter(self._batch_outputs(self.base), batches, "encoder", outputs)
            return
        rows = _Rows(outputs)
        self.tap.stream(batches, rows, feeds=self.base, desc=None)
        self.reference = rows.batches
        self.scale = sum(float(np.sum(y**2)) for ref in self.reference for y in ref) or 1.0

    def _batch_outputs(self, feeds: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Per batch, the outputs the meter reads, whole (padding and all)."""
        out: list[dict[str, np.ndarray]] = []

        def keep(name: str, array: np.ndarray, batch) -> None:
            if name == self.tap.names[0]:  # a batch's arrays come in the tap's order
                out.append({})
            out[-1][name] = array

        self.tap.stream(self.batches, keep, feeds=feeds, desc=None)
        return out

    def loss(self, trial: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> float:
        """The model's output loss (see the module's docstring), matrix i fed trial[i] = (A, B, b)."""
        feeds = dict(self.base)
        for i, arrays in trial.items():
            dt = self.base[self.names[i][2]].dtype
            feeds.update({n: x.astype(dt) for n, x in zip(self.names[i], arrays, strict=True)})
        if self.meter is not None:
            return self.meter.measure(self._batch_outputs(feeds)).loss
        err = _SquaredError(self.outputs, self.reference)
        self.tap.stream(self.batches, err, feeds=feeds, desc=None)
        return err.total / self.scale
