"""Numerics of the pruning passes in numpy only: streaming Gram, elimination order,
global allocation and the ridge least-squares repair (no graphs)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnxpress.activations import Gram
from onnxpress.passes.prune import scoring


def _features(rng, n, d, scales=None):
    # anisotropic, correlated, non-centred: like real context / intermediate activations
    mix = rng.standard_normal((d, d)) * (np.logspace(0, -1.5, d) if scales is None else scales)[:, None]
    return rng.standard_normal((n, d)) @ mix + 0.5 * rng.standard_normal(d)


def _err(x, w, b, keep, w_new, b_new):
    return float(((x[:, keep] @ w_new + b_new - (x @ w + b)) ** 2).sum())


def test_streaming_gram_equals_batch():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 7)).astype(np.float32)
    g = Gram(dim=7)
    for part in np.array_split(x, 5):
        g.add(part)
    xa = np.hstack([x.astype(np.float64), np.ones((300, 1))])
    np.testing.assert_allclose(g.matrix(), xa.T @ xa, rtol=1e-10)
    w, b = rng.standard_normal((7, 3)), rng.standard_normal(3)
    assert np.isclose(scoring.output_energy(g, w, b), float(((x @ w + b) ** 2).sum()), rtol=1e-5)


def test_added_grams_equal_the_gram_of_all_rows():
    rng = np.random.default_rng(2)
    x, x_ref = rng.standard_normal((50, 5)), rng.standard_normal((50, 5))
    total = Gram.of(x[:20], x_ref[:20]) + Gram.of(x[20:], x_ref[20:])
    whole = Gram.of(x, x_ref)
    assert total.count == 50
    for name in ("xtx", "sum", "cross", "xtx_ref", "sum_ref"):
        np.testing.assert_allclose(getattr(total, name), getattr(whole, name), rtol=1e-12)
    with pytest.raises(ValueError, match="reference"):
        Gram.of(x) + Gram.of(x, x_ref)


def test_ridge_refit_is_least_squares_and_beats_plain_slicing():
    rng = np.random.default_rng(1)
    x = _features(rng, 2000, 24)
    w, b = rng.standard_normal((24, 10)), rng.standard_normal(10)
    keep = np.arange(0, 24, 2)
    w_new, b_new = scoring.ridge_refit(Gram.of(x), w, b, keep, ridge=1e-12)
    # same answer as an explicit lstsq on [X_keep 1]
    xa = np.hstack([x[:, keep], np.ones((len(x), 1))])
    ref = np.linalg.lstsq(xa, x @ w + b, rcond=None)[0]
    np.testing.assert_allclose(w_new, ref[:-1], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(b_new, ref[-1], rtol=1e-6, atol=1e-8)
    assert _err(x, w, b, keep, w_new, b_new) < 0.5 * _err(x, w, b, keep, w[keep], b)


def test_refit_keeping_everything_reproduces_the_layer():
    rng = np.random.default_rng(2)
    x = _features(rng, 500, 12)
    w, b = rng.standard_normal((12, 5)), rng.standard_normal(5)
    w_new, b_new = scoring.ridge_refit(Gram.of(x), w, b, np.arange(12), ridge=1e-10)
    np.testing.assert_allclose(w_new, w, atol=1e-5)
    np.testing.assert_allclose(b_new, b, atol=1e-5)


def test_refit_survives_dead_features():
    rng = np.random.default_rng(3)
    x = _features(rng, 400, 10)
    x[:, 3] = 0.0  # a dead neuron: singular Gram without the ridge
    w, b = rng.standard_normal((10, 4)), rng.standard_normal(4)
    w_new, b_new = scoring.ridge_refit(Gram.of(x), w, b, np.array([0, 1, 2, 3, 5]))
    assert np.all(np.isfinite(w_new)) and np.all(np.isfinite(b_new))


@pytest.mark.parametrize("group_size", [1, 3])
def test_repair_elimination_errors_are_the_refit_errors(group_size):
    """The OBS path's recorded error after k removals equals the error of refitting
    the kept features from scratch, for every k."""
    rng = np.random.default_rng(4)
    n_groups = 6
    d = n_groups * group_size
    x = _features(rng, 3000, d)
    w, b = rng.standard_normal((d, 8)), rng.standard_normal(8)
    groups = [np.arange(i * group_size, (i + 1) * group_size) for i in range(n_groups)]
    gram = Gram.of(x)
    elim = scoring.eliminate_with_repair(gram, w, b, groups, n_groups - 1, ridge=1e-12)
    assert len(elim.order) == n_groups - 1 and len(set(elim.order)) == n_groups - 1
    for k in range(1, n_groups):
        removed = set(elim.order[:k])
        keep = np.concatenate([groups[i] for i in range(n_groups) if i not in removed])
        w_new, b_new = scoring.ridge_refit(gram, w, b, keep, ridge=1e-12)
        assert np.isclose(elim.errors[k - 1], _err(x, w, b, keep, w_new, b_new), rtol=1e-4, atol=1e-6)


def test_repair_elimination_first_choice_is_optimal_single_removal():
    rng = np.random.default_rng(5)
    x = _features(rng, 2000, 8)
    w, b = rng.standard_normal((8, 4)), rng.standard_normal(4)
    gram = Gram.of(x)
    groups = [np.array([i]) for i in range(8)]
    elim = scoring.eliminate_with_repair(gram, w, b, groups, 1, ridge=1e-12)
    costs = []
    for i in range(8):
        keep = np.array([j for j in range(8) if j != i])
        costs.append(_err(x, w, b, keep, *scoring.ridge_refit(gram, w, b, keep, ridge=1e-12)))
    assert elim.order[0] == int(np.argmin(costs))


def test_chunked_elimination_is_close_to_one_at_a_time():
    rng = np.random.default_rng(6)
    x = _features(rng, 4000, 64)
    w, b = rng.standard_normal((64, 16)), rng.standard_normal(16)
    gram = Gram.of(x)
    groups = [np.array([i]) for i in range(64)]
    one = scoring.eliminate_with_repair(gram, w, b, groups, 32)
    eight = scoring.eliminate_with_repair(gram, w, b, groups, 32, chunk=8)
    assert eight.errors[-1] <= 1.5 * one.errors[-1]
    assert np.all(np.diff(eight.errors) >= 0)


def test_no_repair_elimination_matches_direct_error():
    rng = np.random.default_rng(7)
    x = _features(rng, 1000, 12)
    w = rng.standard_normal((12, 6))
    groups = [np.arange(i * 3, i * 3 + 3) for i in range(4)]
    elim = scoring.eliminate_without_repair(Gram.of(x), w, groups, 3)
    for k in range(1, 4):
        cols = np.concatenate([groups[i] for i in elim.order[:k]])
        direct = float(((x[:, cols] @ w[cols]) ** 2).sum())
        assert np.isclose(elim.errors[k - 1], direct, rtol=1e-8) or elim.errors[k - 1] >= direct


def test_contribution_beats_weight_norm_when_activations_differ():
    """A group with big weights but near-silent inputs is the right one to remove;
    the weight-norm baseline removes a loud one instead."""
    rng = np.random.default_rng(8)
    scales = np.array([1.0, 1.0, 1.0, 0.01])
    x = rng.standard_normal((2000, 4)) * scales
    w = np.diag([1.0, 1.0, 0.5, 10.0])
    groups = [np.array([i]) for i in range(4)]
    gram = Gram.of(x)
    assert scoring.eliminate_without_repair(gram, w, groups, 1).order == [3]
    assert scoring.eliminate_with_repair(gram, w, None, groups, 1).order == [3]
    assert scoring.eliminate_by_weight_norm(w, groups, 1).order == [2]


def _brute_force(curves, budget):
    best = None
    ranges = [range(len(c.path()) + 1) for c in curves]
    for counts in itertools.product(*ranges):
        saved = sum(k * c.unit_cost for k, c in zip(counts, curves, strict=True))
        if saved < budget:
            continue
        loss = sum(c.path()[k - 1] if k else 0.0 for k, c in zip(counts, curves, strict=True))
        if best is None or loss < best[0] - 1e-12:
            best = (loss, counts)
    return best


def test_allocation_is_optimal_on_convex_curves_and_meets_budget():
    rng = np.random.default_rng(9)
    for _ in range(20):
        curves = []
        for _layer in range(3):
            inc = np.sort(rng.exponential(size=4))  # increasing increments -> convex path
            curves.append(scoring.LayerCurve(scoring.Elimination(list(range(4)), np.cumsum(inc)), unit_cost=1.0,
                                        scale=float(rng.uniform(0.5, 2.0))))
        budget = int(rng.integers(1, 12))
        counts = scoring.allocate(curves, budget)
        assert sum(counts) == budget
        loss = sum(c.path()[k - 1] if k else 0.0 for k, c in zip(counts, curves, strict=True))
        assert np.isclose(loss, _brute_force(curves, budget)[0])


def test_allocation_respects_caps_costs_and_zero_budget():
    path = scoring.Elimination([0, 1, 2], np.array([1.0, 2.0, 3.0]))
    curves = [scoring.LayerCurve(path, unit_cost=2.0, max_remove=2), scoring.LayerCurve(path, unit_cost=1.0, scale=100.0)]
    assert scoring.allocate(curves, 0) == [0, 0]
    counts = scoring.allocate(curves, 5)
    assert counts[0] <= 2 and counts[1] == 3  # the cheap-to-lose layer (large scale) goes first
    assert 2 * counts[0] + counts[1] >= 5
    # infeasible budget: take everything allowed
    assert scoring.allocate(curves, 100) == [2, 3]


def test_allocation_sees_past_a_costly_first_step():
    """Non-convex path: one expensive removal unlocks cheap ones; the hull finds it."""
    a = scoring.LayerCurve(scoring.Elimination([0, 1, 2], np.array([3.0, 3.0, 3.0])), unit_cost=1.0)
    b = scoring.LayerCurve(scoring.Elimination([0, 1, 2], np.array([1.2, 2.4, 3.6])), unit_cost=1.0)
    assert scoring.allocate([a, b], 3) == [3, 0]


class _OutputLoss:
    """Stands in for the prober: a layer's loss grows with the rows its trial weight zeroes,
    ``sensitivity[i] * removed**1.5``, summed over the trial's layers; it checks each trial is
    the elimination order, repaired."""

    def __init__(self, matrices, orders, sensitivity):
        self.matrices, self.orders, self.sensitivity = matrices, orders, sensitivity
        self.trials = []

    def loss(self, trial):
        self.trials.append(sorted(trial))
        total = 0.0
        for i, (a, b, bias) in trial.items():
            m = self.matrices[i]
            full, eye = (b, a) if m.d_in <= m.d_out else (a, b)
            assert full.shape == (m.d_in, m.d_out) and np.array_equal(eye, np.eye(min(m.d_in, m.d_out)))
            zero = np.flatnonzero(~full.any(axis=1))
            assert list(zero) == sorted(self.orders[i][:len(zero)])  # the first k of the order go
            assert np.all(full[full.any(axis=1)] == 2.0) and np.all(bias == 3.0)  # the repaired rows and bias
            total += self.sensitivity[i] * len(zero) ** 1.5
        return total


def _probe_case(shape, layers, sensitivity):
    from types import SimpleNamespace

    rng = np.random.default_rng(3)
    d_in, d_out = shape
    matrices = [SimpleNamespace(d_in=d_in, d_out=d_out, layer=i, key=f"layer{i}.projection") for i in range(layers)]
    orders = [list(rng.permutation(d_in)) for _ in matrices]
    # the proxy curves say nothing useful (equal everywhere): only the measured loss can decide
    curves = [scoring.LayerCurve(scoring.Elimination(o, np.arange(1.0, d_in + 1)), unit_cost=1.0,
                                 max_remove=d_in - 1) for o in orders]
    groups = [[np.array([j]) for j in range(d_in)] for _ in matrices]
    trials = [lambda keep: (np.full((len(keep), d_out), 2.0), np.full(d_out, 3.0))] * layers
    prober = _OutputLoss(matrices, orders, sensitivity)
    counts = scoring.probe_counts(prober, matrices, curves, groups, trials, 0.25, [d_in] * layers)
    assert sum(counts) == round(0.25 * layers * d_in)
    return counts, prober.trials


@pytest.mark.parametrize("shape", [(16, 4), (4, 16)])
def test_probe_allocation_spares_the_layer_the_outputs_feel_and_meets_the_budget(shape):
    counts, trials = _probe_case(shape, 3, sensitivity=[10.0, 1.0, 1.0])
    assert counts[0] < counts[1] and counts[0] < counts[2]
    assert all(len(t) == 1 for t in trials)  # few layers: each is probed alone


def test_probe_allocation_probes_many_layers_in_buckets():
    sensitivity = [10.0] * 8 + [1.0] * 32
    counts, trials = _probe_case((16, 4), 40, sensitivity)
    assert len(trials) <= 4 * 6 and {len(t) for t in trials} == {8}  # 216 // 40 = 5 buckets of 8 layers
    assert max(counts[:8]) < min(counts[8:])
    assert max(counts[:8]) - min(counts[:8]) <= 1  # a bucket's layers share its share
