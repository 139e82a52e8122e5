"""Tests of the factorization numerics on random matrices: whitened SVD, refits and
rank allocation under a parameter budget."""

from __future__ import annotations

import numpy as np
import pytest

from onnxpress import factorization as fz


def _correlated_inputs(rng, n, d):
    # anisotropic inputs, like real activations: a few directions carry most energy
    mix = rng.standard_normal((d, d)) * np.logspace(0, -2, d)[:, None]
    return rng.standard_normal((n, d)) @ mix + 0.3 * rng.standard_normal(d)

# ---------------------------------------------------------------------------- numerics


def test_whitened_svd_minimises_output_error_better_than_plain():
    rng = np.random.default_rng(0)
    x = _correlated_inputs(rng, 2000, 48)
    w = rng.standard_normal((48, 32))
    gram = x.T @ x
    for rank in (4, 8, 16):
        a_p, b_p = fz.decompose(w).factors(rank)
        a_w, b_w = fz.decompose(w, gram, eps=1e-9).factors(rank)
        err_plain = np.linalg.norm(x @ w - x @ a_p @ b_p)
        err_white = np.linalg.norm(x @ w - x @ a_w @ b_w)
        assert err_white < 0.8 * err_plain
        # the dropped energies are exactly the output error on the calibration data
        dec = fz.decompose(w, gram, eps=1e-12)
        assert np.isclose(err_white**2, dec.energy[rank:].sum(), rtol=1e-4)


def test_full_rank_is_exact_and_plain_svd_minimises_weight_error():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((20, 30))
    x = _correlated_inputs(rng, 500, 20)
    for dec in (fz.decompose(w), fz.decompose(w, x.T @ x)):
        a, b = dec.factors(20)
        np.testing.assert_allclose(a @ b, w, atol=1e-8)
    a, b = fz.decompose(w).factors(5)
    s = np.linalg.svd(w, compute_uv=False)
    assert np.isclose(np.linalg.norm(w - a @ b) ** 2, (s[5:] ** 2).sum())


def test_factors_have_equal_norms_per_rank_one_term_even_when_whitened():
    rng = np.random.default_rng(5)
    x = 20.0 * _correlated_inputs(rng, 1000, 32)  # large activations: whitening shrinks A
    w = 0.05 * rng.standard_normal((32, 24))
    for dec in (fz.decompose(w), fz.decompose(w, x.T @ x)):
        a, b = dec.factors(10)
        np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=1), rtol=1e-10)
        a, b = dec.factors(24)  # full rank: exact
        np.testing.assert_allclose(a @ b, w, atol=1e-10)


def test_cross_fit_recovers_original_outputs_from_perturbed_inputs():
    """Sequential fitting: with X' = X + noise, the rank-r factors fitted to (X', X W)
    reproduce X W better than factors fitted on X alone."""
    rng = np.random.default_rng(2)
    x = _correlated_inputs(rng, 3000, 40)
    x_new = x @ (np.eye(40) + 0.1 * rng.standard_normal((40, 40)))
    w = rng.standard_normal((40, 40))
    a0, b0 = fz.decompose(w, x.T @ x).factors(12)
    a1, b1 = fz.decompose(w, x_new.T @ x_new, cross=x_new.T @ x).factors(12)
    err_naive = np.linalg.norm(x_new @ a0 @ b0 - x @ w)
    err_cross = np.linalg.norm(x_new @ a1 @ b1 - x @ w)
    assert err_cross < 0.9 * err_naive


def test_residual_target_cancels_predictable_upstream_error():
    """A matrix whose output is added to a residual stream R' (original R): fitted with
    residual = X'^T (R - R'), X' W_r + R' gets closer to X W + R than the plain cross fz."""
    rng = np.random.default_rng(5)
    x = _correlated_inputs(rng, 3000, 32)
    x_new = x + 0.05 * rng.standard_normal(x.shape)
    w = rng.standard_normal((32, 24))
    diff = x_new @ (0.2 * rng.standard_normal((32, 24))) + 0.01 * rng.standard_normal((3000, 24))  # R - R'
    gram, cross = x_new.T @ x_new, x_new.T @ x
    for rank in (8, 24):
        a0, b0 = fz.decompose(w, gram, cross=cross).factors(rank)
        a1, b1 = fz.decompose(w, gram, cross=cross, residual=x_new.T @ diff).factors(rank)
        err_plain = np.linalg.norm(x_new @ a0 @ b0 - x @ w - diff)
        err_res = np.linalg.norm(x_new @ a1 @ b1 - x @ w - diff)
        assert err_res < 0.8 * err_plain


def test_refit_prior_curbs_overfitting_with_few_tokens_and_tends_to_the_weight():
    """Sequential refit with fewer calibration tokens than twice the input dimension: the
    unregularised least-squares fit chases the calibration tokens, the prior towards W generalises
    better to held-out tokens; an overwhelming prior returns W itself."""
    rng = np.random.default_rng(6)
    d, rank = 64, 24
    w = rng.standard_normal((d, d))
    mix = np.eye(d) + 0.05 * rng.standard_normal((d, d))
    x_cal, x_test = _correlated_inputs(rng, 80, d), _correlated_inputs(rng, 4000, d)
    noisy = lambda x: x @ mix + 0.05 * rng.standard_normal(x.shape)  # noqa: E731  compressed upstream

    cal_new, test_new = noisy(x_cal), noisy(x_test)
    gram, cross = cal_new.T @ cal_new, cal_new.T @ x_cal
    scale = np.trace(gram) / len(x_cal)  # lambda per pseudo-token per input dimension

    def held_out(prior):
        a, b = fz.decompose(w, gram, cross=cross, prior=prior * scale).factors(rank)
        return np.linalg.norm(test_new @ a @ b - x_test @ w)

    assert held_out(1.0) < 0.9 * held_out(0.0)
    a, b = fz.decompose(w, gram, cross=cross, prior=1e9 * scale).factors(d)
    np.testing.assert_allclose(a @ b, w, rtol=1e-3, atol=1e-3)  # up to the Cholesky ridge eps


def test_measured_allocation_takes_cheapest_losses_and_meets_the_budget_exactly():
    # unit 0 loses little per parameter, unit 1 a lot, unit 2 has a noisy point above its hull
    curves = [[(10, 1.0), (20, 3.0), (30, 9.0)], [(10, 5.0), (20, 12.0)], [(10, 4.0), (20, 4.5), (30, 12.0)]]
    saved = fz.allocate_measured(curves, 45)
    assert sum(saved) == pytest.approx(45)
    # hull moves by loss per parameter: u0 0->10 (0.1), u0 10->20 (0.2), u2 0->20 (0.225, over
    # the noisy point), u1 0->10 (0.5, half of it to meet the budget); u0 20->30 (0.6) not reached
    assert saved == pytest.approx([20.0, 5.0, 20.0])
    assert fz.allocate_measured(curves, 200) == pytest.approx([30.0, 20.0, 30.0])  # all there is


def test_bias_shift_restores_mean_output():
    rng = np.random.default_rng(3)
    x = _correlated_inputs(rng, 1000, 16) + 2.0
    w = rng.standard_normal((16, 8))
    a, b = fz.decompose(w).factors(3)
    shift = fz.bias_shift(w, a @ b, x.mean(0))
    np.testing.assert_allclose((x @ a @ b + shift).mean(0), (x @ w).mean(0), atol=1e-9)


def test_break_even_rank_never_adds_cost():
    for d_in, d_out in [(2, 2), (3, 5), (64, 64), (384, 1536), (1, 100)]:
        r = fz.break_even_rank(d_in, d_out)
        assert r * (d_in + d_out) < d_in * d_out or r == 0
        assert (r + 1) * (d_in + d_out) >= d_in * d_out
    assert fz.break_even_rank(1, 100) == 0


def _candidates(rng, shapes):
    cands = []
    for d_in, d_out in shapes:
        decay = rng.uniform(0.5, 3.0)
        energy = np.sort(rng.uniform(0.5, 1, min(d_in, d_out)) * np.arange(1, min(d_in, d_out) + 1) ** -decay)[::-1]
        cands.append(fz.Candidate(d_in, d_out, energy))
    return cands


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.4, 0.6])
def test_allocation_respects_the_budget(fraction):
    rng = np.random.default_rng(4)
    cands = _candidates(rng, [(64, 64), (64, 256), (256, 64), (64, 16)] * 3)
    total = sum(c.full_cost for c in cands)
    for ranks in (fz.global_ranks(cands, fraction * total), fz.uniform_ranks(cands, fraction)):
        saved = fz.params_saved(cands, ranks)
        largest_move = max(c.full_cost for c in cands)
        assert fraction * total * 0.97 <= saved <= fraction * total + largest_move
        for c, r in zip(cands, ranks, strict=True):  # a split never costs more than it saves
            assert r is None or 1 <= r <= fz.break_even_rank(c.d_in, c.d_out)


def test_global_allocation_loses_less_than_uniform_on_its_objective():
    rng = np.random.default_rng(5)
    cands = _candidates(rng, [(64, 256), (256, 64)] * 4)
    total = sum(c.full_cost for c in cands)
    g = fz.global_ranks(cands, 0.3 * total)
    u = fz.uniform_ranks(cands, 0.3)

    def loss(ranks):
        return sum(c.loss(r) if r else 0.0 for c, r in zip(cands, ranks, strict=True))

    assert fz.params_saved(cands, g) >= 0.3 * total
    assert loss(g) <= loss(u) + 1e-12
