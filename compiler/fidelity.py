"""How far a model moved, measured two ways.

- Between stages, on the raw outputs: ``rel_l2`` (||new - ref|| / ||ref||, worst output) is
  what every pass reports on the verification batches and what the pass manager re-measures
  on the saved model (``compare_outputs``). Cosines are taken per output row.
- End to end, against the compile's input model, in the model's own terms
  (``FidelityMeter``): encoders, the cosine of mask-pooled sentence embeddings; decoders, the
  relative change in next-token perplexity. The compile report and the automatic search both
  use it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnx_ir as ir

# Standard errors above the mean loss that a loss bound adds (the search's "fits" criterion).
CONFIDENCE_Z = 2.0


@dataclass(frozen=True)
class Fidelity:
    rel_l2: float
    max_abs: float
    cosine_mean: float
    cosine_min: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


EXACT = Fidelity(rel_l2=0.0, max_abs=0.0, cosine_mean=1.0, cosine_min=1.0)


def primary_outputs(model: ir.Model) -> list[str]:
    """Outputs that are compared between stages: everything but the KV cache,
    whose shape legitimately changes when heads are pruned."""
    names = [v.name for v in model.graph.outputs]
    primary = [n for n in names if not n.startswith("present")]
    return primary or names


def row_cosines(ref: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows (last axis is the vector)."""
    a = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    b = new.reshape(-1, new.shape[-1]).astype(np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    # Rows that are zero in both (e.g. fully padded) agree perfectly.
    return np.where(den > 0, num / np.maximum(den, 1e-300), np.where(num == 0, 1.0, 0.0))


def compare_outputs(
    refs: Iterable[Mapping[str, np.ndarray]], news: Iterable[Mapping[str, np.ndarray]]
) -> Fidelity:
    """Compare two runs (output dicts, one per batch, read once in order: lists, stores or
    generators) over their shared float outputs."""
    sq_err: dict[str, float] = {}
    sq_ref: dict[str, float] = {}
    max_abs = 0.0
    cosines: list[np.ndarray] = []
    for ref_batch, new_batch in _in_step(refs, news):
        max_abs = max(max_abs, _add_differences(ref_batch, new_batch, sq_err, sq_ref, cosines))
        del ref_batch, new_batch  # before the next batch is run (``runtime.iter_batches``)
    if not sq_err:
        raise ValueError("no comparable float outputs between the two runs")
    rel = max(np.sqrt(sq_err[n] / sq_ref[n]) if sq_ref[n] > 0 else np.sqrt(sq_err[n]) for n in sq_err)
    cos = np.concatenate(cosines) if cosines else np.ones(1)
    return Fidelity(float(rel), max_abs, float(cos.mean()), float(cos.min()))


_MISSING = object()


def _in_step(first: Iterable, second: Iterable) -> Iterator[tuple]:
    """``zip(first, second, strict=True)`` holding nothing of one pair while the next is taken:
    zip's reused result tuple keeps the last pair until both new items are in, so a batch ONNX
    Runtime returned would keep its buffer in the session's arena busy through the next run."""
    second = iter(second)
    for a in first:
        b = next(second, _MISSING)
        if b is _MISSING:
            raise ValueError("the second sequence is shorter than the first")
        yield a, b
        del a, b
    if next(second, _MISSING) is not _MISSING:
        raise ValueError("the second sequence is longer than the first")


def _add_differences(ref_batch: Mapping[str, np.ndarray], new_batch: Mapping[str, np.ndarray],
                     sq_err: dict[str, float], sq_ref: dict[str, float], cosines: list[np.ndarray]) -> float:
    """``compare_outputs`` for one batch: adds to the sums and row cosines; returns the largest
    absolute difference."""
    max_abs = 0.0
    for name, ref in ref_batch.items():
        new = new_batch.get(name)
        if new is None or ref.shape != new.shape or not np.issubdtype(ref.dtype, np.floating):
            continue
        for ref_rows, new_rows in zip(_row_parts(ref), _row_parts(new), strict=True):
            diff = new_rows.astype(np.float64) - ref_rows
            sq_err[name] = sq_err.get(name, 0.0) + float((diff**2).sum())
            sq_ref[name] = sq_ref.get(name, 0.0) + float((ref_rows.astype(np.float64) ** 2).sum())
            if diff.size:
                max_abs = max(max_abs, float(np.abs(diff).max()))
                cosines.append(row_cosines(ref_rows, new_rows))
    return max_abs


def _row_parts(array: np.ndarray, elements: int = 1 << 20) -> Iterator[np.ndarray]:
    """``array`` as [rows, last axis], a few rows at a time: float64 copies of a whole batch of a
    large vocabulary's logits would take gigabytes."""
    if not array.size:
        yield array.reshape(0, 0)
        return
    rows = array.reshape(-1, array.shape[-1] if array.ndim else 1)
    step = max(1, elements // max(rows.shape[1], 1))
    for start in range(0, max(len(rows), 1), step):
        yield rows[start : start + step]


# Positions whose log-softmax is taken at once: a large vocabulary's logits in float64 take 50 MB
# for one sequence of 128 tokens (SmolLM2), several times what a compile holds beside its session.
NLL_POSITIONS = 16


def next_token_nll(
    outputs: Iterable[Mapping[str, np.ndarray]], feeds: Sequence[Mapping[str, np.ndarray]]
) -> tuple[float, np.ndarray]:
    """A decoder's mean next-token negative log-likelihood of its input text (``logits``
    against the shifted ``input_ids``, padding masked out), and the mean per sequence."""
    total = count = 0.0
    rows = []
    for out, batch in _in_step(outputs, feeds):
        target = batch["input_ids"][:, 1:]
        mask = batch.get("attention_mask", np.ones_like(batch["input_ids"]))[:, -target.shape[1] - 1 :][:, 1:]
        picked = [_sequence_log_likelihoods(logits, t) * m for logits, t, m in zip(out["logits"], target, mask, strict=True)]
        del out  # before the next batch is run (``runtime.iter_batches``)
        total -= float(sum(p.sum() for p in picked))
        count += float(mask.sum())
        rows += [-p.sum() / max(m.sum(), 1) for p, m in zip(picked, mask, strict=True)]
    return total / max(count, 1.0), np.array(rows)


def _sequence_log_likelihoods(logits: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Each next token's log-probability in one sequence, ``NLL_POSITIONS`` positions at a time (the
    last position predicts nothing here)."""
    logits = logits[: len(target)]
    return np.concatenate([_log_softmax_picked(logits[i : i + NLL_POSITIONS], target[i : i + NLL_POSITIONS])
                           for i in range(0, len(target), NLL_POSITIONS)])


def _log_softmax_picked(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``log_softmax(logits)[i, targets[i]]`` in float64 (one copy, exponentiated in place)."""
    work = logits.astype(np.float64)
    work -= work.max(-1, keepdims=True)
    chosen = work[np.arange(len(targets)), targets]
    return chosen - np.log(np.exp(work, out=work).sum(-1))


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of ``hidden`` [batch, seq, dim] over the positions ``mask`` marks, in float64."""
    weights = mask.astype(np.float64)[..., None]
    return (hidden.astype(np.float64) * weights).sum(1) / np.maximum(weights.sum(1), 1.0)


def model_kind(model: ir.Model) -> str:
    """'decoder' when the model emits logits (a language model), else 'encoder'."""
    return "decoder" if any(v.name == "logits" for v in model.graph.outputs) else "encoder"


def standard_error(samples: np.ndarray) -> float:
    return float(samples.std(ddof=1) / math.sqrt(len(samples))) if len(samples) > 1 else 0.0


@dataclass(frozen=True)
class TaskFidelity:
    """A model against a reference model on the same samples, in the model's own terms.

    ``loss`` is what the automatic search's budget bounds: ``1 - cosine_mean`` for
    encoders, ``perplexity_change`` for decoders; ``loss_bound`` adds ``CONFIDENCE_Z``
    standard errors over the samples."""

    metric: str  # "embedding cosine", "output cosine" or "perplexity"
    samples: int
    loss: float
    loss_bound: float
    cosine_mean: float | None = None
    cosine_min: float | None = None
    perplexity_change: float | None = None  # ppl / ppl_reference - 1
    perplexity: float | None = None
    perplexity_reference: float | None = None

    def to_dict(self) -> dict[str, float | int | str]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class FidelityMeter:
    """End-to-end fidelity of a model's outputs against a reference model's on fixed batches.

    - encoders with an ``attention_mask`` input: cosine of the sentence embeddings (the first
      output, mean-pooled over the mask), per sample;
    - other encoders (e.g. vision, no mask): cosine of every output row (token vector);
    - decoders (a ``logits`` output): next-token perplexity of the batches' own text, relative
      to the reference's.

    Built from the reference's outputs (``reference``: one dict per batch holding at least
    ``outputs``), so a caller that already ran the reference pays nothing more."""

    def __init__(self, reference: Iterable[Mapping[str, np.ndarray]], batches: Sequence[Mapping[str, np.ndarray]],
                 kind: str, output_names: Sequence[str]):
        self.batches, self.kind = list(batches), kind
        self.outputs = self.outputs_for(kind, output_names, batches)
        self.pooled = kind == "encoder" and all("attention_mask" in b for b in batches)
        if kind == "decoder":
            self.metric, self.definition = "perplexity", "relative perplexity increase"
        elif self.pooled:
            self.metric, self.definition = "embedding cosine", "1 - mean cosine of mask-pooled embeddings"
        else:
            self.metric, self.definition = "output cosine", "1 - mean row cosine of the outputs"
        self.samples = sum(next(iter(b.values())).shape[0] for b in self.batches) if self.batches else 0
        if kind == "decoder":  # only the likelihoods are kept: a large vocabulary's logits take gigabytes
            self.reference_nll, self.reference_rows = next_token_nll(reference, self.batches)
            self.reference = []
        else:
            self.reference = [{n: r[n] for n in self.outputs} for r in reference]

    @staticmethod
    def outputs_for(kind: str, output_names: Sequence[str], batches: Sequence[Mapping[str, np.ndarray]]) -> list[str]:
        """The outputs the measure reads: ``logits`` (decoders), the first output (pooled
        encoders) or all of ``output_names``."""
        if kind == "decoder":
            return ["logits"]
        if all("attention_mask" in b for b in batches):
            return list(output_names[:1])
        return list(output_names)

    @classmethod
    def of_model(cls, model: ir.Model, batches: Sequence[Mapping[str, np.ndarray]], *, kind: str | None = None,
                 threads: int | None = None) -> FidelityMeter:
        """A meter whose reference is ``model`` run on ``batches``."""
        from onnxpress.runtime import iter_batches, make_session

        kind = kind or model_kind(model)
        names = cls.outputs_for(kind, primary_outputs(model), batches)
        # one batch at a time: a decoder's meter keeps only the likelihoods of its logits
        reference = iter_batches(make_session(model, threads=threads), batches, names)
        return cls(reference, batches, kind, names)

    def measure(self, outputs: Iterable[Mapping[str, np.ndarray]]) -> TaskFidelity:
        """Fidelity of ``outputs`` (one dict per batch, holding ``self.outputs``; read once, in order)
        against the reference."""
        if self.kind == "decoder":
            nll, per_row = next_token_nll(outputs, self.batches)
            shift = nll - self.reference_nll
            bound = shift + CONFIDENCE_Z * standard_error(per_row - self.reference_rows)
            return TaskFidelity(
                self.metric, self.samples, loss=math.expm1(shift), loss_bound=math.expm1(bound),
                perplexity_change=math.expm1(shift), perplexity=math.exp(nll),
                perplexity_reference=math.exp(self.reference_nll),
            )
        cosines = self._cosines(outputs)
        loss = float(1.0 - cosines.mean())
        return TaskFidelity(
            self.metric, self.samples, loss=loss, loss_bound=loss + CONFIDENCE_Z * standard_error(cosines),
            cosine_mean=float(cosines.mean()), cosine_min=float(cosines.min()),
        )

    def _cosines(self, outputs: Iterable[Mapping[str, np.ndarray]]) -> np.ndarray:
        """Cosine per sample (pooled) or per output row, over every comparable float output."""
        parts = []
        for ref, new, batch in zip(self.reference, outputs, self.batches, strict=True):
            for name in self.outputs:
                a, b = ref[name], new[name]
                if a.shape != b.shape or not np.issubdtype(a.dtype, np.floating):
                    continue
                if self.pooled:
                    a, b = mean_pool(a, batch["attention_mask"]), mean_pool(b, batch["attention_mask"])
                parts.append(row_cosines(a, b))
        if not parts:
            raise ValueError("no comparable float outputs between the two runs")
        return np.concatenate(parts)
