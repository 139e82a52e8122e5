"""How far a model's outputs moved: the one error measure every pass reports.

``rel_l2`` (||new - ref|| / ||ref||, worst output) is the headline number: passes
report it on the verification batch and the pass manager re-measures it on the
saved model. Cosines are taken per output row (token or sequence vector).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnx_ir as ir


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
    refs: Sequence[Mapping[str, np.ndarray]], news: Sequence[Mapping[str, np.ndarray]]
) -> Fidelity:
    """Compare two runs (lists of output dicts, one per batch) over their shared float outputs."""
    sq_err: dict[str, float] = {}
    sq_ref: dict[str, float] = {}
    max_abs = 0.0
    cosines: list[np.ndarray] = []
    for ref_batch, new_batch in zip(refs, news, strict=True):
        for name, ref in ref_batch.items():
            new = new_batch.get(name)
            if new is None or ref.shape != new.shape or not np.issubdtype(ref.dtype, np.floating):
                continue
            diff = new.astype(np.float64) - ref.astype(np.float64)
            sq_err[name] = sq_err.get(name, 0.0) + float((diff**2).sum())
            sq_ref[name] = sq_ref.get(name, 0.0) + float((ref.astype(np.float64) ** 2).sum())
            if diff.size:
                max_abs = max(max_abs, float(np.abs(diff).max()))
                cosines.append(row_cosines(ref, new))
    if not sq_err:
        raise ValueError("no comparable float outputs between the two runs")
    rel = max(np.sqrt(sq_err[n] / sq_ref[n]) if sq_ref[n] > 0 else np.sqrt(sq_err[n]) for n in sq_err)
    cos = np.concatenate(cosines) if cosines else np.ones(1)
    return Fidelity(float(rel), max_abs, float(cos.mean()), float(cos.min()))


def next_token_nll(
    outputs: Sequence[Mapping[str, np.ndarray]], feeds: Sequence[Mapping[str, np.ndarray]]
) -> tuple[float, np.ndarray]:
    """A decoder's mean next-token negative log-likelihood of its input text (``logits``
    against the shifted ``input_ids``, padding masked out), and the mean per sequence."""
    total = count = 0.0
    rows = []
    for out, batch in zip(outputs, feeds, strict=True):
        logits = out["logits"][:, :-1].astype(np.float64)
        target = batch["input_ids"][:, 1:]
        mask = batch.get("attention_mask", np.ones_like(batch["input_ids"]))[:, -target.shape[1] - 1 :][:, 1:]
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        picked = np.take_along_axis(logp, target[..., None], -1)[..., 0]
        total -= float((picked * mask).sum())
        count += float(mask.sum())
        rows.append(-(picked * mask).sum(-1) / np.maximum(mask.sum(-1), 1))
    return total / max(count, 1.0), np.concatenate(rows)
