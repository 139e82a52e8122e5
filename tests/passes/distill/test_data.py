"""Distillation's training batches: every text lands in exactly one batch, held out or not,
and batches group texts of similar length so that little of a step is spent on padding."""

from __future__ import annotations

import numpy as np

from onnxpress.datasets import load_tokenizer
from onnxpress.passes.distill.data import token_batches

from tiny_models import tiny_model


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["the", "nation", "budget", "of", "our", "people", "and", "we", "will", "work"]
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 60)))) for _ in range(n)]


def test_batches_hold_every_text_once_with_little_padding():
    tokenizer = load_tokenizer(tiny_model("bert").parent)
    texts = _texts(200)
    data = token_batches(texts, tokenizer, batch_size=8, max_length=64, holdout=0.1, max_texts=1000, seed=0)
    batches = data.train + data.holdout
    rows = sorted(tuple(row[keep.astype(bool)]) for ids, mask in batches for row, keep in zip(ids, mask, strict=True))
    expected = sorted(tuple(seq) for seq in tokenizer(texts, truncation=True, max_length=64)["input_ids"])
    assert rows == expected
    assert sum(len(ids) for ids, _ in data.holdout) == 20
    padded = sum(ids.size for ids, _ in batches)
    real = sum(int(mask.sum()) for _, mask in batches)
    # unsorted batches of these lengths (1..60 words) pad to about twice the real tokens
    assert padded / real < 1.15
    again = token_batches(texts, tokenizer, batch_size=8, max_length=64, holdout=0.1, max_texts=1000, seed=0)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(data.train, again.train, strict=True))
