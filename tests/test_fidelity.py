"""The measures of a stage: a decoder's next-token negative log-likelihood of the input text (padding
masked out), and how they read a session's batches."""

import weakref

import numpy as np
import pytest
from scipy.special import log_softmax

from onnxpress import fidelity
from onnxpress.fidelity import next_token_nll


@pytest.mark.parametrize("positions", [fidelity.NLL_POSITIONS, 4])  # 4: a sequence's positions in two chunks
def test_next_token_nll_is_the_mean_cross_entropy_of_the_unmasked_next_tokens(monkeypatch, positions):
    monkeypatch.setattr(fidelity, "NLL_POSITIONS", positions)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, (3, 7))
    mask = np.ones_like(ids)
    mask[1, 5:] = 0  # right padding
    batches = [{"input_ids": ids[:2], "attention_mask": mask[:2]}, {"input_ids": ids[2:], "attention_mask": mask[2:]}]
    logits = (rng.standard_normal((3, 7, 50)) * 4).astype(np.float32)
    outputs = [{"logits": logits[:2]}, {"logits": logits[2:]}]

    logp = log_softmax(logits[:, :-1].astype(np.float64), axis=-1)
    picked = np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0] * mask[:, 1:]
    mean, per_sequence = next_token_nll(outputs, batches)
    np.testing.assert_allclose(mean, -picked.sum() / mask[:, 1:].sum(), rtol=1e-12)
    np.testing.assert_allclose(per_sequence, -picked.sum(1) / mask[:, 1:].sum(1), rtol=1e-12)


class _ArenaSession:
    """Stands in for an ONNX Runtime session, whose outputs live in its memory arena: each run
    checks that no output of the run before it is still held, so the arena could reuse it."""

    def __init__(self):
        self.rng = np.random.default_rng(1)
        self.last = None

    def get_inputs(self):
        return []

    def run(self, names, feeds):
        assert self.last is None or self.last() is None, "the previous batch's outputs are still held"
        logits = self.rng.standard_normal((1, 6, 11)).astype(np.float32)
        self.last = weakref.ref(logits)
        return [logits]


@pytest.mark.parametrize("consumer", ["store", "compare", "nll"])
def test_each_batch_is_let_go_before_the_next_one_runs(consumer):
    from onnxpress.output_store import OutputStore
    from onnxpress.runtime import iter_batches

    feeds = [{"input_ids": np.arange(6)[None] % 11, "attention_mask": np.ones((1, 6), np.int64)} for _ in range(4)]

    def batches():
        return iter_batches(_ArenaSession(), feeds, ["logits"])

    if consumer == "store":
        for memory in (0, 1 << 20):  # written to disk, or copied into memory
            assert len(OutputStore.of(batches(), memory_bytes=memory)) == 4
    elif consumer == "compare":
        refs = [{"logits": np.zeros((1, 6, 11), np.float32)} for _ in feeds]
        assert fidelity.compare_outputs(refs, batches()).rel_l2 > 0
    else:
        assert np.isfinite(next_token_nll(batches(), feeds)[0])
