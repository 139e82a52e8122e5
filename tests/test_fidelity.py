"""The decoder measure: next-token negative log-likelihood of the input text, padding masked out."""

import numpy as np
from scipy.special import log_softmax

from onnxpress.fidelity import next_token_nll


def test_next_token_nll_is_the_mean_cross_entropy_of_the_unmasked_next_tokens():
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
