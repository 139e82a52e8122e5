"""The text distillation trains on: unlabeled, from the calibration's sources, disjoint from
the calibration samples themselves and from every evaluation split.

* named data (``--calib sotu|bbc|default``): the *training* split of the same corpora
  (SOTU speeches of 1950-1989, BBC News articles of the training split);
* the user's text files: their sentences (or chunks), shuffled with the seed;
* an ``.npz`` calibration (no text): its own batches.

Encoders train on sentences (what sentence-embedding models embed), decoders on chunks
that fill their window. A held-out share is kept aside to stop training when it stops
improving.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxpress import datasets
from onnxpress.calibration import make_feeds, pad_right
from onnxpress.errors import OnnxpressError

Feeds = dict[str, np.ndarray]


@dataclass
class TextBatches:
    """Token batches for training and for the held-out loss, and where the text came from."""

    train: list[tuple[np.ndarray, np.ndarray]]  # (input_ids, attention_mask), right-padded
    holdout: list[tuple[np.ndarray, np.ndarray]]
    source: str
    texts: int
    replaceable: np.ndarray | None = None  # token ids augmentation may substitute (None: no augmentation)


def read_texts(ctx, *, sentences: bool, max_chars: int) -> tuple[list[str], str] | None:
    """The training texts for this compile and a description; None without text (npz data)."""
    if ctx.named_text is not None:
        corpora = datasets.NAMED_CALIBRATIONS[ctx.named_text]
        files = [f for corpus in corpora for f in datasets.corpus_files(corpus, "training")]
        source = " + ".join(datasets.describe_split("training", c) for c in corpora)
    elif ctx.text_files:
        files = datasets.expand_text_paths(ctx.text_files)
        source = f"{len(files)} text file(s) of the calibration"
    else:
        return None
    texts = []
    for path in files:
        text = datasets.read_text(path)
        texts += datasets.split_sentences(text) if sentences else datasets.text_chunks(text, max_chars)
    return texts, source


# the held-out loss is evaluated many times: more texts than this only slow it down
MAX_HOLDOUT_TEXTS = 256


def token_batches(
    texts: list[str], tokenizer, *, batch_size: int, max_length: int, holdout: float, max_texts: int, seed: int
) -> TextBatches:
    """Shuffled (seeded) texts cut to ``max_texts``, the last ``holdout`` share (at most
    ``MAX_HOLDOUT_TEXTS``) held out, tokenized into right-padded batches of texts of similar
    length: padding to a batch's longest text would otherwise spend about half of each step
    on pad tokens (sentence lengths vary several-fold). The trainer shuffles the batches."""
    if len(texts) < 2:
        raise OnnxpressError("distill: fewer than two training texts: give more calibration text")
    order = np.random.default_rng(seed).permutation(len(texts))[:max_texts]
    n_hold = min(MAX_HOLDOUT_TEXTS, max(1, int(round(len(order) * holdout))))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def batches(indices) -> list[tuple[np.ndarray, np.ndarray]]:
        ids = tokenizer([texts[i] for i in indices], truncation=True, max_length=max_length)["input_ids"]
        ids = sorted((seq or [pad_id] for seq in ids), key=len)  # stable: equal lengths keep the seeded order
        return [pad_right(ids[start : start + batch_size], pad_id) for start in range(0, len(ids), batch_size)]

    return TextBatches(batches(order[:-n_hold]), batches(order[-n_hold:]), "", len(order))


def feeds_for(model: ir.Model, ids: np.ndarray, mask: np.ndarray) -> Feeds:
    """Feeds of ``model``'s inputs (empty KV cache, position ids from the mask) for one batch."""
    return make_feeds(model, ids, mask)


def batches_from_calibration(calibration, holdout: float) -> TextBatches:
    """The calibration's own token batches (no text to draw more from)."""
    pairs = [(b["input_ids"], b.get("attention_mask", np.ones_like(b["input_ids"]))) for b in calibration.batches]
    if len(pairs) < 2 or any(ids.ndim != 2 for ids, _ in pairs):
        raise OnnxpressError("distill: needs token calibration data (input_ids) of at least two batches")
    n_hold = max(1, int(round(len(pairs) * holdout)))
    return TextBatches(pairs[:-n_hold], pairs[-n_hold:], f"the calibration batches ({calibration.source})",
                       sum(len(ids) for ids, _ in pairs))
