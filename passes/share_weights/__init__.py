"""Cross-layer weight sharing: several layers use one stored weight.

Calibration -> decision -> rewrite:

1. the matrices: roles (FFN up/gate/down, attention Q/K/V/O) from the analysis map, via
   the low-rank pass's selection; the roles in ``share`` are grouped across ``group_size``
   adjacent layers of equal shape, the other selected roles stay alone (a group of one is
   the low-rank pass's whitened SVD);
2. the Gram X^T X of every matrix's input on calibration data; each group's weights are
   whitened, stacked and decomposed (:mod:`onnxpress.passes.share_weights.fit`);
3. ranks under one budget (``fraction`` of the selected matrices' parameters), with the
   allocators of :mod:`onnxpress.factorization`, one candidate per group;
4. per group, basis sharing ``W_i ~ B C_i`` (or ``C_i B`` on the output side), or, with
   ``mode: tie``/``auto``, a shared base plus per-layer low-rank residuals when that has the
   lower calibration error at no more parameters; bias correction restores mean outputs.

The shared tensor is one initializer consumed by the MatMul of every layer in the group,
so the file stores it once and ONNX Runtime loads it once. Large models are saved with
external data by ``onnxpress.model_io``. bench/bench_share.py compares with the low-rank pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_ir as ir
from threadpoolctl import threadpool_limits

from onnxpress import factorization as fz
from onnxpress.activations import Gram, capture_grams
from onnxpress.analysis.matrices import ROLES, Matrix, select_matrices
from onnxpress.editing import (
    GraphEditor,
    drop_unused_initializers,
    editor_of,
    remove_dead_nodes,
    split_matrix,
)
from onnxpress.pass_infra import Outcome, Pass, PassConfig, register_pass
from onnxpress.passes.share_weights import fit as sfit

# Basis Sharing shares the matrices that read the (normalised) residual stream; O and down
# read per-layer activations and are compressed alone by default (bench: side=output).
SHARED_ROLES = ["attn.q", "attn.k", "attn.v", "attn.qkv", "ffn.up", "ffn.gate"]


@dataclass
class ShareWeightsConfig(PassConfig):
    fraction: float = 0.2  # share of the selected matrices' parameters to remove; 0: no change
    include: list[str] = field(default_factory=lambda: list(ROLES))  # roles compressed at all
    share: list[str] = field(default_factory=lambda: list(SHARED_ROLES))  # roles shared across layers
    group_size: int = 2  # layers per group
    grouping: Literal["adjacent", "similar"] = "adjacent"  # similar: by whitened-weight similarity
    side: Literal["auto", "input", "output"] = "auto"  # auto: output side for attn.o/ffn.down
    mode: Literal["basis", "tie", "auto"] = "auto"  # auto: per group, the lower calibration error
    allocation: Literal["global", "uniform"] = "global"
    bias_correction: bool = True
    eps: float = fz.DEFAULT_EPS
    max_batches: int | None = None  # calibration batches of 8 samples used (None: all)

    def validate(self) -> None:
        if not 0 <= self.fraction < 1:
            self.fail("fraction", f"must be in [0, 1) (share of parameters removed, 0 = off), got {self.fraction}")
        for name in ("include", "share"):
            bad = [r for r in getattr(self, name) if r not in ROLES]
            if bad:
                self.fail(name, f"entry {bad[0]!r} is not a role; use some of {', '.join(ROLES)}")
        if not self.include:
            self.fail("include", f"must name at least one role ({', '.join(ROLES)})")
        if not 1 <= self.group_size <= 64:
            self.fail("group_size", f"must be 1..64 layers per group, e.g. 2, got {self.group_size}")
        if not 0 <= self.eps < 1:
            self.fail("eps", f"must be in [0, 1), e.g. 1e-4, got {self.eps}")
        if self.max_batches is not None and self.max_batches < 1:
            self.fail("max_batches", f"must be a positive number of batches, got {self.max_batches}")


@dataclass
class Group:
    role: str
    members: list[Matrix]
    side: str
    dec: sfit.GroupDecomposition | None = None

    @property
    def layers(self) -> list[int]:
        return [m.layer for m in self.members]


def make_groups(matrices: list[Matrix], cfg: ShareWeightsConfig, stats=None) -> list[Group]:
    """Layers of one role, ``group_size`` at a time (equal shapes and dtypes only): adjacent ones,
    or (``grouping: similar``, needs ``stats``) the most similar whitened weights."""
    by_role: dict[str, list[Matrix]] = {}
    for m in matrices:
        by_role.setdefault(m.key.split(".", 1)[1], []).append(m)
    groups = []
    for role, ms in by_role.items():
        ms.sort(key=lambda m: m.layer)
        size = cfg.group_size if role in cfg.share else 1
        side = cfg.side if cfg.side != "auto" else ("output" if role in ("attn.o", "ffn.down") else "input")
        if cfg.grouping == "similar" and size > 1:
            groups += _similar_groups(role, ms, size, side, stats, cfg.eps)
            continue
        run: list[Matrix] = []
        for m in ms:
            fits = run and m.weight.shape == run[0].weight.shape and m.dtype == run[0].dtype \
                and m.layer == run[-1].layer + 1
            if run and (len(run) == size or not fits):
                groups.append(Group(role, run, side))
                run = []
            run.append(m)
        if run:
            groups.append(Group(role, run, side))
    return groups


def _similar_groups(role, ms, size, side, stats, eps) -> list[Group]:
    buckets: dict[tuple, list[Matrix]] = {}
    for m in ms:
        buckets.setdefault((m.weight.shape, m.dtype), []).append(m)
    groups = []
    for bucket in buckets.values():
        sim = sfit.similarity([m.weight for m in bucket], [stats[m.input.name].xtx for m in bucket], side, eps=eps)
        groups += [Group(role, [bucket[i] for i in idx], side) for idx in sfit.similar_groups(sim, size)]
    return groups


def _input_stats(model: ir.Model, names: list[str], batches, threads) -> dict[str, Gram]:
    """The Gram of each input on calibration tokens (one-shot fitting: no reference terms)."""
    return capture_grams(model, batches, names, threads=threads, desc="share_weights: input statistics").grams


# ----------------------------------------------------------------------------- rewrite


def _weight_input(x: ir.Value, stem: str, second: bool) -> ir.Node:
    """The MatMul that split_matrix made for ``stem`` (its first or second factor)."""
    first = next(n for n, _ in x.uses() if n.name == f"{stem}/lowrank_A")
    return next(n for n, _ in first.outputs[0].uses()) if second else first


def emit_basis(graph: ir.Graph | GraphEditor, group: Group, shared: np.ndarray, parts: list[np.ndarray],
               biases: list[np.ndarray | None]) -> str:
    """Split every member with split_matrix, then point all of them at ONE copy of the
    shared factor (the others are dropped): that is what makes the file and ORT hold it once.
    ``graph`` may be an editor of it (one for a pass rewriting many groups)."""
    editor = editor_of(graph)
    shared_value = None
    for m, part, bias in zip(group.members, parts, biases, strict=True):
        a, b = (shared, part) if group.side == "input" else (part, shared)
        split_matrix(editor, m, a, b, bias)
        node = _weight_input(m.input, m.node.name or m.key, second=group.side == "output")
        if shared_value is None:
            shared_value = node.inputs[1]
            name = f"{m.node.name or m.key}.shared_basis"
            if len(group.members) > 1 and name not in editor.names:
                editor.names.add(name)
                shared_value.name = name  # onnx_ir renames the initializer entry too
        else:
            duplicate = node.inputs[1]
            node.replace_input_with(1, shared_value)
            drop_unused_initializers(editor.graph, [duplicate])
    return shared_value.name


def emit_tie(graph: ir.Graph | GraphEditor, group: Group, base: np.ndarray, residuals, biases) -> str:
    """y_i = (x_i @ A_i) @ B_i + x_i @ base (+ bias): the residual path is split_matrix's, the
    base one initializer read by one extra MatMul per layer, added right after the residual.
    ``graph`` may be an editor of it."""
    editor = editor_of(graph)
    graph = editor.graph
    np_dtype = group.members[0].dtype.numpy()
    stem = group.members[0].node.name or group.members[0].key
    base_value = editor.add_initializer(f"{stem}.shared_base", base.astype(np_dtype))
    for m, (a, b), bias in zip(group.members, residuals, biases, strict=True):
        split_matrix(editor, m, a, b, bias)
        second = _weight_input(m.input, m.node.name or m.key, second=True)
        low = second.outputs[0]
        base_mm = ir.node("MatMul", [m.input, base_value], name=f"{m.node.name or m.key}/shared_base")
        total = ir.Value(name=editor.fresh_name(f"{low.name}_tied"), type=low.type, shape=low.shape)
        ir.convenience.replace_all_uses_with(low, total, replace_graph_outputs=True)
        add = ir.node("Add", [low, base_mm.outputs[0]], outputs=[total], name=f"{m.node.name or m.key}/shared_add")
        base_mm.outputs[0].dtype = m.dtype
        graph.insert_after(second, [base_mm, add])
    return base_value.name


# ----------------------------------------------------------------------------- the pass


@register_pass
class ShareWeightsPass(Pass):
    name = "share_weights"
    config_class = ShareWeightsConfig
    needs_calibration = True

    def apply(self, model: ir.Model, ctx) -> Outcome:
        with threadpool_limits(limits=1):  # see LowRankPass.apply: one BLAS thread on a shared box
            return self._apply(model, ctx)

    def _apply(self, model: ir.Model, ctx) -> Outcome:
        cfg: ShareWeightsConfig = self.config
        none = Outcome(changes={"groups_shared": 0, "matrices_split": 0})
        if cfg.fraction == 0:
            return none
        batches = ctx.calibration_batches(self.name, cfg.max_batches)
        matrices = select_matrices(model, cfg.include, ctx.analysis(model))
        if not matrices:
            return none
        stats = _input_stats(model, sorted({m.input.name for m in matrices}), batches, getattr(ctx, "threads", None))
        groups = make_groups(matrices, cfg, stats)
        # only the energies are kept for the allocation: the factors of a large model's groups take
        # more memory than its weights, so each chosen group is decomposed again when it is fitted
        candidates = [self._decompose(g, stats, cfg).candidate() for g in groups]
        total = sum(m.d_in * m.d_out for m in matrices)
        if cfg.allocation == "uniform":
            ranks = fz.uniform_ranks(candidates, cfg.fraction)
        else:
            ranks = fz.global_ranks(candidates, cfg.fraction * total)
        report, saved, shared_count = [], 0, 0
        editor = GraphEditor(model)
        for g, rank in zip(groups, ranks, strict=True):
            if rank is None:
                continue
            info = self._fit_group(editor, g, rank, stats, cfg)
            saved += info["params_saved"]
            shared_count += len(g.members) > 1
            report.append(info)
        remove_dead_nodes(model)
        return Outcome(
            changes={"groups_shared": shared_count, "matrices_split": sum(len(r["layers"]) for r in report)},
            details={"params_saved": int(saved), "fraction_saved": saved / total, "allocation": cfg.allocation,
                     "calibration_tokens": int(max(s.count for s in stats.values())), "groups": report},
        )

    @staticmethod
    def _decompose(g: Group, stats, cfg: ShareWeightsConfig) -> sfit.GroupDecomposition:
        return sfit.decompose_group([m.weight for m in g.members], [stats[m.input.name].xtx for m in g.members],
                                    g.side, cfg.eps)

    def _fit_group(self, editor: GraphEditor, g: Group, rank: int, stats, cfg: ShareWeightsConfig) -> dict:
        """Fit the group at ``rank`` (basis), or tied at no more parameters when that is better;
        rewrite it and return its report row."""
        g.dec = self._decompose(g, stats, cfg)
        ms = g.members
        n, d_in, d_out = len(ms), ms[0].d_in, ms[0].d_out
        budget = g.dec.cost(rank)
        options = {}
        if cfg.mode in ("basis", "auto"):
            options["basis"] = (g.dec.approximations(rank), budget)
        r_tie = sfit.tie_rank(n, d_in, d_out, budget) if n > 1 else 0
        tie = None
        if cfg.mode in ("tie", "auto") and r_tie >= 1:
            tie = sfit.fit_tie([m.weight for m in ms], [stats[m.input.name].xtx for m in ms], r_tie, cfg.eps)
            options["tie"] = ([tie[0] + a @ b for a, b in tie[1]], sfit.tie_cost(n, d_in, d_out, r_tie))
        if not options:  # mode tie where no residual rank fits the budget: basis sharing instead
            options["basis"] = (g.dec.approximations(rank), budget)
        scored = {}
        for kind, (approx, cost) in options.items():
            biases = [self._bias(m, w_r, stats[m.input.name], cfg) for m, w_r in zip(ms, approx, strict=True)]
            errs = [fz.output_error(m, w_r, stats[m.input.name], b)
                    for m, w_r, b in zip(ms, approx, biases, strict=True)]
            scored[kind] = (errs, biases, cost)
        kind = min(scored, key=lambda k: np.sqrt(np.mean(np.square(scored[k][0]))))
        errs, biases, cost = scored[kind]
        if kind == "basis":
            shared, parts = g.dec.factors(rank)
            name = emit_basis(editor, g, shared, parts, biases)
        else:
            name = emit_tie(editor, g, tie[0], tie[1], biases)
        g.dec = None  # free the factors before the next group
        return {"role": g.role, "layers": g.layers, "mode": kind, "side": g.side if kind == "basis" else None,
                "rank": int(rank if kind == "basis" else r_tie), "shape": [d_in, d_out],
                "params_saved": int(n * d_in * d_out - cost), "shared_tensor": name if n > 1 else None,
                "calibration_error": [float(e) for e in errs]}

    @staticmethod
    def _bias(m: Matrix, w_r: np.ndarray, s: Gram, cfg) -> np.ndarray | None:
        if not cfg.bias_correction:
            return m.bias
        shift = fz.bias_shift(m.weight, w_r, s.mean)
        return shift if m.bias is None else m.bias + shift

