"""End-to-end rank allocation for the low-rank pass (``allocation: probe``).

A per-matrix proxy (the share of a matrix's own output energy dropped) does not say how much
the model's outputs suffer: on MiniLM, allocating by it lost to equal ranks. Here each unit
(the matrices of one role in a bucket of consecutive layers) is split alone at a few
candidate shares of its parameters, and the model's primary outputs are measured on a few
calibration batches (:class:`onnxpress.weight_probe.Prober`); the shares are then chosen
greedily by measured loss per parameter saved (:func:`onnxpress.factorization.allocate_measured`),
assuming the units' losses add.
"""

from __future__ import annotations

import numpy as np

from onnxpress import factorization as fz
from onnxpress.weight_probe import Prober, units_of

LEVELS = (0.5, 1.0, 2.0, 3.0)  # candidate shares removed, relative to the uniform share


def probe_ranks(prober: Prober, matrices: list, grams: list[np.ndarray], means: list[np.ndarray] | None,
                budget: float, eps: float) -> list[int | None]:
    """Ranks saving ``budget`` parameters, shared among units by measured output loss.

    Each unit is probed alone at LEVELS times the uniform share (one-shot whitened factors on
    the Gram matrices ``grams``, bias-corrected with the input ``means`` when given); every
    matrix of a unit then loses the unit's chosen share of its parameters."""
    candidates = [fz.Candidate(m.d_in, m.d_out, np.zeros(1)) for m in matrices]
    share = budget / sum(c.full_cost for c in candidates)
    decs: dict[int, fz.Decomposition] = {}
    units = units_of(matrices)
    curves = []
    for unit in units:
        points = []
        for level in LEVELS:
            ranks = fz.uniform_ranks([candidates[i] for i in unit], min(level * share, 0.95))
            trial = {}
            for i, r in zip(unit, ranks, strict=True):
                if r is None:
                    continue
                m = matrices[i]
                dec = decs.setdefault(i, fz.decompose(m.weight, grams[i], eps=eps))
                a, b = dec.factors(r)
                bias = np.zeros(m.d_out) if m.bias is None else m.bias
                if means is not None:
                    bias = bias + fz.bias_shift(m.weight, a @ b, means[i])
                trial[i] = (a, b, bias)
            saved = fz.params_saved([candidates[i] for i in unit], ranks)
            if saved > 0:
                points.append((float(saved), prober.loss(trial)))
        curves.append(points)
    ranks_out: list[int | None] = [None] * len(matrices)
    for unit, saved in zip(units, fz.allocate_measured(curves, budget), strict=True):
        size = sum(candidates[i].full_cost for i in unit)
        for i, r in zip(unit, fz.uniform_ranks([candidates[i] for i in unit], saved / size), strict=True):
            ranks_out[i] = r if saved > 0 else None
    return ranks_out
