"""Low-rank splitting: ``X @ W`` -> ``(X @ A) @ B`` with A [d_in, r], B [r, d_out].

Calibration -> decision -> rewrite:

1. the matrices: every attention Q/K/V/O and FFN up/gate/down matrix by default, or chosen roles
   from the analysis map, or any constant-weight MatMul/Gemm whose node or weight name matches a regex;
2. capture the Gram matrix X^T X of each matrix's input on calibration data and
   decompose each W by activation-aware (whitened) SVD, whose dropped singular values
   are the output error on that data (``method: plain`` = SVD of W, the baseline);
3. choose ranks under one budget: ``fraction`` of the parameters (or MACs) of all the layers'
   linear matrices (``scope: linear``) or of the selected ones (``scope: selected``);
   ``probe`` (default: greedy on the model's measured output loss per parameter saved, each
   (layer bucket, role) unit split alone at a few shares, :mod:`lowrank_probe`), ``uniform``
   (every selected matrix loses the same share) or ``global`` (greedy on each matrix's own
   normalised truncation loss, a proxy); a rank at which the two factors would cost as much
   as W is never used;
4. fit and rewrite; with ``sequential`` the factors of each group of matrices are fitted
   on the inputs of the model compressed so far, by least squares to the original
   outputs X W, so later layers absorb earlier errors (``residual_correction``: a matrix
   feeding a residual Add also cancels what it can of the residual stream's upstream
   error); ``refit_prior`` pulls those least-squares refits towards W (they over-fit when the
   calibration has few tokens per input dimension); ``bias_correction`` restores the mean
   output on calibration data. The sequential inputs come from running the model segment
   by segment (``_Stream``).

The numerics are in :mod:`onnxpress.passes.lowrank_fit`; bench/bench_lowrank.py
compares the options end to end on MiniLM and SmolLM2 and motivates the defaults.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_ir as ir
from threadpoolctl import threadpool_limits

from onnxpress.activations import token_rows
from onnxpress.analysis import as_linear
from onnxpress.analysis.graph_utils import const_array
from onnxpress.errors import OnnxpressError
from onnxpress.model_io import model_proto
from onnxpress.pass_infra import Outcome, Pass, PassConfig, register_pass
from onnxpress.pass_manager import primary_outputs
from onnxpress.passes import lowrank_fit as fit
from onnxpress.passes import lowrank_probe as probe
from onnxpress.passes.graph_edit import add_initializer, drop_unused_initializers, remove_dead_nodes
from onnxpress.runtime import make_session, session_feeds

ROLES = ("ffn.up", "ffn.gate", "ffn.down", "attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o")
# every role: with the probe allocation the measured losses decide which matrices give the budget
# (on MiniLM it splits attention Q/K hardest and keeps some FFN matrices whole; bench/bench_lowrank.py)
DEFAULT_INCLUDE = ROLES


@dataclass
class LowRankConfig(PassConfig):
    # share of parameters (target=params) or MACs per token (target=macs) to remove; for these
    # matrices both are r * (d_in + d_out) after a split, so the ranks are the same
    fraction: float = 0.2
    # what ``fraction`` is a share of: "linear" = all the layers' attention Q/K/V/O + FFN matrices
    # of the analysis map (whichever ``include`` selects), "selected" = the selected matrices only
    scope: Literal["linear", "selected"] = "linear"
    target: Literal["params", "macs"] = "params"
    method: Literal["whitened", "plain"] = "whitened"
    # uniform: every selected matrix loses the same share; global: greedy on each matrix's own
    # normalised truncation loss (a proxy); probe: greedy on the model's measured output loss
    # with units of matrices split alone at a few shares (lowrank_probe)
    allocation: Literal["uniform", "global", "probe"] = "probe"
    # calibration sequences the probes run on (the first ones); every probe is a forward pass on them
    probe_samples: int = 8
    # roles (ffn.up, attn.q, ...) from the analysis map, or regexes on node / weight names
    include: list[str] = field(default_factory=lambda: list(DEFAULT_INCLUDE))
    sequential: bool = True
    bias_correction: bool = True
    # sequential fits of matrices feeding a residual Add (attention O, FFN down) also cancel what
    # their inputs predict of the upstream error already in the residual stream
    residual_correction: bool = True
    eps: float = fit.DEFAULT_EPS  # Cholesky ridge, relative to the mean Gram diagonal
    # sequential least-squares refits are pulled towards the original W with the weight of this many
    # isotropic pseudo-tokens per input dimension: the refit has d_in unknowns per output and
    # over-fits when the calibration has few tokens per input dimension (SmolLM2's down_proj)
    refit_prior: float = 1.0
    max_batches: int | None = None  # calibration batches used (None: all)

    def validate(self) -> None:
        if not 0 < self.fraction < 1:
            self.fail("fraction", f"must be between 0 and 1 (share of parameters removed), got {self.fraction}")
        if not self.include:
            self.fail("include", f"must name at least one matrix role ({', '.join(ROLES)}) or regex")
        for pattern in self.include:
            if pattern not in ROLES:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    self.fail("include", f"entry {pattern!r} is neither a role ({', '.join(ROLES)}) nor a regex ({exc})")
        if self.refit_prior < 0:
            self.fail("refit_prior", f"must be >= 0 (pseudo-tokens per input dimension), got {self.refit_prior}")
        if not 0 <= self.eps < 1:
            self.fail("eps", f"must be in [0, 1), e.g. 1e-4, got {self.eps}")
        if self.probe_samples < 1:
            self.fail("probe_samples", f"must be a positive number of sequences, got {self.probe_samples}")
        if self.max_batches is not None and self.max_batches < 1:
            self.fail("max_batches", f"must be a positive number of batches, got {self.max_batches}")


# ----------------------------------------------------------------------------- matrices


@dataclass
class Matrix:
    """One weight matrix to split, with the effective W [d_in, d_out] of ``y = x @ W (+ b)``."""

    key: str  # e.g. "layer3.ffn.up" or the node name
    node: ir.Node  # the MatMul or Gemm
    input: ir.Value  # x
    weight: np.ndarray  # effective W, float64
    bias: np.ndarray | None  # effective bias (Gemm: beta * C; MatMul: the Add's constant)
    bias_value: ir.Value | None  # the constant bias input (of the Add or the Gemm)
    bias_node: ir.Node | None  # the Add (MatMul + Add); None for Gemm or no bias
    dtype: ir.DataType
    layer: int | None = None

    @property
    def d_in(self) -> int:
        return self.weight.shape[0]

    @property
    def d_out(self) -> int:
        return self.weight.shape[1]


def _matrix_of(lin, key: str, layer: int | None) -> Matrix | None:
    """The effective W of an analysis ``Linear`` (MatMul or Gemm with a float weight that
    folds to a constant 2-D matrix), or None for kinds this pass leaves alone
    (quantized MatMulNBits, fused attention weights, transA Gemm)."""
    node = lin.node
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm"):
        return None
    w = const_array(node.inputs[1])  # through Identity/Transpose/Cast: the matrix the node sees
    if w is None or w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
        return None
    bias = const_array(lin.bias) if lin.bias is not None else None
    if node.op_type == "Gemm":
        attrs = {k: a.value for k, a in node.attributes.items()}
        if attrs.get("transA", 0):
            return None
        w = attrs.get("alpha", 1.0) * (w.T if attrs.get("transB", 0) else w)
        if lin.bias_node is None and bias is not None:  # Gemm's own C
            bias = attrs.get("beta", 1.0) * bias
    if bias is not None:
        if bias.size != w.shape[1]:
            return None  # C broadcast over rows (or a stranger shape): not a per-channel bias
        bias = bias.reshape(-1).astype(np.float64)
    return Matrix(key, node, lin.input, w.astype(np.float64), bias, lin.bias, lin.bias_node,
                  ir.DataType.from_numpy(w.dtype), layer)


def _linears_by_role(tmap) -> list[tuple[str, int, object]]:
    found = []
    for layer in tmap.layers:
        att, ffn = layer.attention, layer.ffn
        pairs = []
        if att is not None and att.fused_node is None:
            pairs += [("attn.q", att.q), ("attn.k", att.k), ("attn.v", att.v), ("attn.qkv", att.qkv), ("attn.o", att.o)]
        if ffn is not None and not ffn.packed_gate_up:
            pairs += [("ffn.up", ffn.up), ("ffn.gate", ffn.gate), ("ffn.down", ffn.down)]
        elif ffn is not None:
            pairs += [("ffn.up", ffn.up), ("ffn.down", ffn.down)]  # packed [gate | up]: one matrix
        found += [(role, layer.index, lin) for role, lin in pairs if lin is not None]
    return found


def select_matrices(model: ir.Model, include: list[str], tmap=None) -> list[Matrix]:
    """The matrices named by ``include``: roles from the analysis map ``tmap``, regexes
    searched in the node name and the weight name of every constant-weight MatMul/Gemm."""
    roles = {p for p in include if p in ROLES}
    patterns = [re.compile(p) for p in include if p not in ROLES]
    chosen: dict[int, Matrix] = {}  # by node id: a node matched twice is split once
    if roles and tmap is not None:
        for role, index, lin in _linears_by_role(tmap):
            if role in roles and id(lin.node) not in chosen:
                m = _matrix_of(lin, f"layer{index}.{role}", index)
                if m is not None:
                    chosen[id(lin.node)] = m
    if patterns:
        for node in model.graph:
            if id(node) in chosen:
                continue
            lin = as_linear(node)
            if lin is None:
                continue
            names = [node.name or "", lin.weight.name or ""]
            if any(p.search(n) for p in patterns for n in names):
                m = _matrix_of(lin, node.name or lin.weight.name or node.outputs[0].name, None)
                if m is not None:
                    chosen[id(node)] = m
    return list(chosen.values())


# ----------------------------------------------------------------------------- calibration statistics


@dataclass
class InputStats:
    """Streaming second moments of one input tensor over real tokens (padding excluded):
    X' from the model being compressed and X from the original one, on the same tokens.
    Before anything upstream is compressed X' = X and the reference terms are the same arrays."""

    gram: np.ndarray  # X'^T X'
    total: np.ndarray  # sum of X' rows
    count: int
    cross: np.ndarray  # X'^T X
    gram_ref: np.ndarray  # X^T X
    total_ref: np.ndarray  # sum of X rows

    @classmethod
    def zeros(cls, d: int) -> InputStats:
        return cls(np.zeros((d, d)), np.zeros(d), 0, np.zeros((d, d)), np.zeros((d, d)), np.zeros(d))

    def add(self, x: np.ndarray, x_ref: np.ndarray | None, mask: np.ndarray | None) -> None:
        """Accumulate one batch (padding excluded); ``x_ref`` None: only X' terms."""
        # per-batch products in float32 (BLAS sgemm, half the time of float64; a batch has
        # few thousand rows, far from where float32 sums lose digits), accumulated in float64
        rows = token_rows(x, mask).astype(np.float32)
        self.gram += rows.T @ rows
        self.total += rows.sum(0, dtype=np.float64)
        self.count += rows.shape[0]
        if x_ref is not None:
            ref_rows = token_rows(x_ref, mask).astype(np.float32)
            self.cross += rows.T @ ref_rows
            self.gram_ref += ref_rows.T @ ref_rows
            self.total_ref += ref_rows.sum(0, dtype=np.float64)

    def same_inputs(self) -> InputStats:
        """These X' statistics as the whole record for X' = X (the reference terms share the arrays)."""
        return InputStats(self.gram, self.total, self.count, self.gram, self.gram, self.total)

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    @property
    def mean_ref(self) -> np.ndarray:
        return self.total_ref / max(self.count, 1)


@dataclass
class ResidualStats:
    """What a matrix's output is added to (the residual stream at a residual Add): its upstream
    error D = R - R' (original minus compressed) against the inputs, so the split matrix can
    also cancel the part of that error its inputs predict."""

    cross: np.ndarray  # X'^T D
    cross_ref: np.ndarray  # X^T D
    total: np.ndarray  # sum of D rows
    sq: float = 0.0  # ||D||^2

    @classmethod
    def zeros(cls, d_in: int, d_out: int) -> ResidualStats:
        return cls(np.zeros((d_in, d_out)), np.zeros((d_in, d_out)), np.zeros(d_out))

    def add(self, x, x_ref, r, r_ref, mask) -> None:
        rows, ref_rows = token_rows(x, mask).astype(np.float32), token_rows(x_ref, mask).astype(np.float32)
        diff = token_rows(r_ref, mask).astype(np.float32) - token_rows(r, mask).astype(np.float32)
        self.cross += rows.T @ diff
        self.cross_ref += ref_rows.T @ diff
        self.total += diff.sum(0, dtype=np.float64)
        self.sq += float(np.sum(diff.astype(np.float64) ** 2))


def trim_padding(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch without its trailing all-padding positions (a batch of short sentences padded
    to max_length is mostly padding): every [batch, seq] feed cut at the last real token.
    Exact: padded positions are masked, so the real tokens' values do not depend on them."""
    mask = feeds.get("attention_mask")
    if mask is None or mask.ndim != 2 or not mask.any():
        return feeds
    length = int(np.flatnonzero(mask.any(0))[-1]) + 1
    # a non-empty KV cache, or a 2-D feed not aligned with the mask: the positions are not just the mask's
    if length == mask.shape[1] or any((a.ndim >= 3 and a.size) or (a.ndim == 2 and a.shape != mask.shape)
                                      for a in feeds.values()):
        return feeds
    return {k: a[:, :length] if a.ndim == 2 else a for k, a in feeds.items()}


def residual_of(m: Matrix) -> ir.Value | None:
    """The other input of the Add that takes m's output (after its bias), when it is not a
    constant: the residual stream for attention O and FFN down projections."""
    out = (m.bias_node or m.node).outputs[0]
    for node, _ in out.uses():
        if node.op_type == "Add" and node.domain in ("", "ai.onnx") and len(node.inputs) == 2:
            other = node.inputs[1] if node.inputs[0] is out else node.inputs[0]
            if other is not None and other is not out and other.const_value is None and const_array(other) is None:
                return other
    return None


def _probe_session(model: ir.Model, names: list[str], dtypes: dict[str, ir.DataType], threads: int | None):
    """A session whose outputs are the tensors ``names``, on a copy of ``model`` pruned to
    the nodes they need (ORT runs every node otherwise; early groups need only the first layers)."""
    probe = ir.from_proto(model_proto(model))
    values = {v.name: v for node in probe.graph for v in node.outputs}
    values.update({v.name: v for v in probe.graph.inputs})
    probe.graph.outputs.clear()
    for name in names:
        value = values[name]
        if value.dtype is None:
            value.dtype = dtypes[name]  # ORT needs the element type of every graph output
        probe.graph.outputs.append(value)
    remove_dead_nodes(probe)
    return make_session(probe, threads=threads)


def collect_stats(
    model: ir.Model,
    names: list[str],
    dtypes: dict[str, ir.DataType],
    batches: list[dict[str, np.ndarray]],
    *,
    reference: ir.Model | None = None,
    threads: int | None = None,
) -> dict[str, InputStats]:
    """Gram, sum and count of each named tensor on ``batches``; with ``reference``,
    also the cross products with the same tensor of the reference model (same tokens)."""
    session = _probe_session(model, names, dtypes, threads)
    ref_session = _probe_session(reference, names, dtypes, threads) if reference is not None else None
    stats: dict[str, InputStats] = {}
    for feeds in batches:
        outs = session.run(names, session_feeds(session, feeds))
        refs = (ref_session.run(names, session_feeds(ref_session, feeds)) if ref_session is not None
                else [None] * len(names))
        for name, x, x_ref in zip(names, outs, refs, strict=True):
            if name not in stats:
                stats[name] = InputStats.zeros(x.shape[-1])
            stats[name].add(x, x_ref, feeds.get("attention_mask"))
    if reference is None:
        stats = {k: v.same_inputs() for k, v in stats.items()}
    return stats


class _Stream:
    """One model run segment by segment over the calibration batches, for sequential fitting.

    The graph (topologically ordered) is cut just before a node; the values made before the
    cut and used after it (the residual stream, the attention mask, ...) are kept per batch,
    and the next segment runs from them: a whole sequential fit costs about one forward pass
    instead of one model prefix per group. Nodes after the cut may be rewritten in between."""

    def __init__(self, model: ir.Model, batches: list[dict[str, np.ndarray]], types: dict[str, int],
                 threads: int | None):
        self.model, self.batches, self.types, self.threads = model, batches, types, threads
        self.done: set[int] = set()  # ids of the nodes before the cut (never rewritten later)
        self.kept: list[dict[str, np.ndarray]] = [{} for _ in batches]  # live values at the cut

    def advance(self, first: ir.Node, wanted: list[str]) -> list[list[np.ndarray]]:
        """Move the cut to just before ``first``; returns the ``wanted`` tensors per batch."""
        nodes = list(self.model.graph)
        stop = nodes.index(first)
        segment = [n for n in nodes[:stop] if id(n) not in self.done]
        made = {v.name for n in nodes[:stop] for v in n.outputs}
        live = {v.name for n in nodes[stop:] for v in n.inputs if v is not None and v.name in made}
        carried = set(self.kept[0])
        outputs = sorted((live | set(wanted)) - carried - {v.name for v in self.model.graph.inputs})
        session = make_session(self._segment_proto(segment, carried, outputs), threads=self.threads) if outputs else None
        results = []
        for b, feeds in enumerate(self.batches):
            values = {**feeds, **self.kept[b]}
            if session is not None:
                values.update(zip(outputs, session.run(outputs, session_feeds(session, values)), strict=True))
            self.kept[b] = {k: values[k] for k in live}
            results.append([values[n] for n in wanted])
        self.done.update(id(n) for n in nodes[:stop])
        return results

    def _segment_proto(self, segment: list[ir.Node], carried: set[str], outputs: list[str]) -> bytes:
        from onnx import helper

        graph_inputs = {v.name for v in self.model.graph.inputs}
        produced = {v.name for node in segment for v in node.outputs}
        inputs, inits, seen = [], [], set()
        for v in (v for node in segment for v in node.inputs):
            if v is None or v.name in produced or v.name in seen:
                continue
            seen.add(v.name)
            if v.name in carried or v.name in graph_inputs:
                inputs.append(helper.make_tensor_value_info(v.name, self.types[v.name], None))
            elif v.const_value is not None:
                inits.append(ir.serde.serialize_tensor(v.const_value))
                inits[-1].name = v.name
        outs = [helper.make_tensor_value_info(n, self.types[n], None) for n in outputs]
        graph = helper.make_graph([ir.serde.serialize_node(n) for n in segment], "segment", inputs, outs, inits)
        opsets = [helper.make_opsetid(d, v) for d, v in self.model.opset_imports.items()]
        return helper.make_model(graph, opset_imports=opsets, ir_version=self.model.ir_version).SerializeToString()


def value_types(model: ir.Model) -> dict[str, int]:
    """Element type (TensorProto enum) of every named value, by ONNX shape inference where
    the graph does not record it."""
    import onnx

    types = {v.name: int(v.dtype) for v in model.graph.inputs if v.dtype is not None}
    missing = [v for node in model.graph for v in node.outputs if v.dtype is None]
    if missing:
        inferred = onnx.shape_inference.infer_shapes(model_proto(model)).graph
        for info in list(inferred.value_info) + list(inferred.output):
            if info.type.tensor_type.elem_type:
                types[info.name] = info.type.tensor_type.elem_type
    types.update({v.name: int(v.dtype) for node in model.graph for v in node.outputs if v.dtype is not None})
    return types


# ----------------------------------------------------------------------------- rewrite


def split_matrix(graph: ir.Graph, m: Matrix, a: np.ndarray | ir.Value, b: np.ndarray | ir.Value,
                 bias: np.ndarray | ir.Value | None) -> None:
    """Replace m.node by MatMul(x, A) -> MatMul(., B) (+ bias), in the original float dtype.

    MatMul + Add: the Add stays; its constant is replaced when the bias changed.
    Gemm: becomes MatMul, MatMul, Add(beta * C) (alpha is folded into B, transB into A).
    A, B and the bias may also be given as values (graph inputs, for the allocation probes).
    """
    np_dtype = m.dtype.numpy()
    stem = m.node.name or m.key

    def value(x, name):
        return x if isinstance(x, ir.Value) else add_initializer(graph, f"{stem}.{name}", x.astype(np_dtype))

    a_val, b_val = value(a, "lowrank_A"), value(b, "lowrank_B")
    first = ir.node("MatMul", [m.input, a_val], name=f"{stem}/lowrank_A")
    second = ir.node("MatMul", [first.outputs[0], b_val], name=f"{stem}/lowrank_B")
    new_nodes = [first, second]
    out = second.outputs[0]
    if bias is not None and m.bias_node is not None:  # MatMul + Add: the Add stays, with the new constant
        idx = next(i for i, v in enumerate(m.bias_node.inputs) if v is m.bias_value)
        m.bias_node.replace_input_with(idx, value(bias, "bias"))
    elif bias is not None:  # Gemm's C, or a bias correction where there was no bias: a new Add
        add = ir.node("Add", [out, value(bias, "bias")], name=f"{stem}/bias")
        new_nodes.append(add)
        out = add.outputs[0]
    old_out = m.node.outputs[0]
    for v in (first.outputs[0], second.outputs[0], out):
        v.dtype = m.dtype
    out.shape = old_out.shape
    ir.convenience.replace_nodes_and_values(graph, m.node, [m.node], new_nodes, [old_out], [out])
    drop_unused_initializers(graph, [v for v in (m.bias_value,) if v is not None])


# ----------------------------------------------------------------------------- the pass


@register_pass
class LowRankPass(Pass):
    name = "lowrank"
    config_class = LowRankConfig
    needs_calibration = True

    def apply(self, model: ir.Model, ctx) -> Outcome:
        # One BLAS thread for the numerics (ORT keeps its own pool): OpenBLAS threads spin-wait,
        # and on a shared machine an SVD with several of them ran ~20x slower than with one.
        with threadpool_limits(limits=1):
            return self._apply(model, ctx)

    def _apply(self, model: ir.Model, ctx) -> Outcome:
        cfg: LowRankConfig = self.config
        calib = ctx.require_calibration(self.name)
        batches = list(calib.batches)[: cfg.max_batches] if cfg.max_batches else list(calib.batches)
        batches = [trim_padding(feeds) for feeds in batches]
        needs_map = cfg.scope == "linear" or any(p in ROLES for p in cfg.include)
        tmap = ctx.analysis(model) if needs_map else None
        matrices = [m for m in select_matrices(model, cfg.include, tmap) if fit.break_even_rank(m.d_in, m.d_out) >= 1]
        if not matrices:
            return Outcome(changes={"matrices_split": 0}, details={"reason": "no splittable matrix selected"})
        base = budget_base(model, matrices, tmap, cfg.scope)
        budget = cfg.fraction * base
        most = sum(m.d_in * m.d_out - fit.factor_cost(1, m.d_in, m.d_out) for m in matrices)
        if budget > most:
            raise OnnxpressError(f"lowrank: removing {cfg.fraction:.0%} of the {cfg.scope} parameters needs more than "
                                 f"the selected matrices can give ({most / base:.0%} at rank 1): include more roles "
                                 "or lower fraction")
        threads = getattr(ctx, "threads", None)
        dtypes = {m.input.name: m.dtype for m in matrices}
        sequential = cfg.sequential and cfg.method == "whitened"
        # a sequential fit gathers its own statistics while it streams the model
        needs_stats = cfg.allocation != "uniform" or (not sequential and (cfg.method == "whitened" or cfg.bias_correction))
        stats = collect_stats(model, sorted(dtypes), dtypes, batches, threads=threads) if needs_stats else {}
        if cfg.allocation == "probe":
            outputs = getattr(ctx, "output_names", None) or primary_outputs(model)
            prober = probe.Prober(model, matrices, split_matrix, probe.first_samples(batches, cfg.probe_samples),
                                  outputs, threads)
            means = [stats[m.input.name].mean for m in matrices] if cfg.bias_correction else None
            plan = probe.probe_ranks(prober, matrices, [stats[m.input.name].gram for m in matrices], means,
                                     budget, cfg.eps)
        else:
            plan = plan_ranks(matrices, stats, cfg, budget=budget)
        chosen = [(m, r) for m, r in zip(matrices, plan, strict=True) if r is not None]
        if sequential:
            errors, tokens = self._fit_sequential(model, chosen, batches, cfg, threads)
        else:
            errors = {}
            for m, r in chosen:
                errors[m.key] = _fit_and_split(model.graph, m, r, stats.get(m.input.name), cfg)
            tokens = max((s.count for s in stats.values()), default=0)
        remove_dead_nodes(model)
        saved = sum(m.d_in * m.d_out - fit.factor_cost(r, m.d_in, m.d_out) for m, r in chosen)
        return Outcome(
            changes={"matrices_split": len(chosen)},
            details={
                "method": cfg.method,
                "allocation": cfg.allocation,
                "sequential": cfg.sequential and cfg.method == "whitened",
                "params_saved": int(saved),  # = MACs per token saved
                "scope": cfg.scope,
                "fraction_saved": saved / base,  # of the scope's parameters (and MACs)
                "fraction_saved_of_selected": saved / sum(m.d_in * m.d_out for m in matrices),
                "target": cfg.target,
                "calibration_tokens": int(tokens),
                "ranks": {m.key: {"rank": r, "shape": [m.d_in, m.d_out], "fit_error": errors.get(m.key)}
                          for m, r in chosen},
            },
        )

    def _fit_sequential(self, model, chosen, batches, cfg, threads) -> tuple[dict[str, float], int]:
        """Fit group after group (matrices sharing an input, in graph order), each on the
        inputs of the model as compressed so far, towards the original outputs; returns the
        fit errors by matrix key and the number of calibration tokens."""
        reference = ir.from_proto(model_proto(model))  # frozen copy of the uncompressed model
        ref_node = {id(a): b for a, b in zip(model.graph, reference.graph, strict=True)}  # same order
        order = {id(node): i for i, node in enumerate(model.graph)}
        groups: dict[str, list[tuple[Matrix, int]]] = defaultdict(list)
        for m, r in chosen:
            groups[m.input.name].append((m, r))
        firsts = {name: min((m.node for m, _ in g), key=lambda n: order[id(n)]) for name, g in groups.items()}
        names = sorted(groups, key=lambda n: order[id(firsts[n])])
        types = value_types(model)
        stream, ref_stream = _Stream(model, batches, types, threads), _Stream(reference, batches, types, threads)
        errors = {}
        for i, name in enumerate(names):
            first = firsts[name]
            residuals = {}  # residual value name by matrix key: only those computed before the group
            if cfg.residual_correction and i > 0:
                for m, _ in groups[name]:
                    res = residual_of(m)
                    producer = res.producer() if res is not None else None
                    if producer is not None and order.get(id(producer), len(order)) < order[id(first)]:
                        residuals[m.key] = res.name
            wanted = [name, *sorted(set(residuals.values()))]
            xs = stream.advance(first, wanted)
            xs_ref = ref_stream.advance(ref_node[id(first)], wanted)
            mask = [feeds.get("attention_mask") for feeds in batches]
            s = InputStats.zeros(groups[name][0][0].d_in)
            for x, x_ref, k in zip(xs, xs_ref, mask, strict=True):
                s.add(x[0], x_ref[0] if i > 0 else None, k)
            if i == 0:  # nothing upstream is compressed yet: the inputs are the original ones
                s = s.same_inputs()
            for m, r in groups[name]:
                res_stats = None
                if m.key in residuals:
                    j = wanted.index(residuals[m.key])
                    res_stats = ResidualStats.zeros(m.d_in, m.d_out)
                    for x, x_ref, k in zip(xs, xs_ref, mask, strict=True):
                        res_stats.add(x[0], x_ref[0], x[j], x_ref[j], k)
                errors[m.key] = _fit_and_split(model.graph, m, r, s, cfg, res_stats)
        return errors, s.count


def budget_base(model: ir.Model, matrices: list[Matrix], tmap, scope: str) -> int:
    """Parameters that ``fraction`` is a share of: the selected matrices, or (scope "linear")
    those together with every attention/FFN matrix of the analysis map."""
    sizes = {id(m.node): m.d_in * m.d_out for m in matrices}
    if scope == "linear" and tmap is not None:
        for m in select_matrices(model, list(ROLES), tmap):
            sizes.setdefault(id(m.node), m.d_in * m.d_out)
    return sum(sizes.values())


def plan_ranks(matrices: list[Matrix], stats: dict[str, InputStats], cfg: LowRankConfig,
               budget: float | None = None) -> list[int | None]:
    """One rank per matrix (None: keep it whole) saving ``budget`` parameters (default:
    ``fraction`` of the matrices' size).

    Both targets count the same thing here: a split layer costs r * (d_in + d_out)
    parameters and as many MACs per token (every selected matrix runs once per token),
    so ``params`` and ``macs`` budgets pick the same ranks.
    """
    total = sum(m.d_in * m.d_out for m in matrices)
    budget = cfg.fraction * total if budget is None else budget
    if cfg.allocation == "uniform":
        return fit.uniform_ranks([fit.Candidate(m.d_in, m.d_out, np.zeros(1)) for m in matrices], budget / total)
    candidates = []
    for m in matrices:
        gram = stats[m.input.name].gram if cfg.method == "whitened" else None
        candidates.append(fit.Candidate(m.d_in, m.d_out, fit.decompose(m.weight, gram, eps=cfg.eps).energy))
    return fit.global_ranks(candidates, budget)


def _fit_and_split(graph: ir.Graph, m: Matrix, rank: int, s: InputStats | None, cfg: LowRankConfig,
                   res: ResidualStats | None = None) -> float:
    """Factorise m at ``rank`` and rewrite it; returns the relative output error on the
    calibration data (||X'AB - XW|| / ||XW||, bias correction included; with ``res``, the
    error of the residual sum X'AB + R' against XW + R, still relative to ||XW||)."""
    whitened = cfg.method == "whitened" and s is not None
    # the cross term only matters once X' differs from X (sequential fitting after the first group)
    cross = s.cross if whitened and s.cross is not s.gram else None
    res = res if whitened and cross is not None else None
    # prior in pseudo-tokens per input dimension: lambda = refit_prior * mean ||x'||^2 per token
    prior = cfg.refit_prior * float(np.trace(s.gram)) / max(s.count, 1) if cross is not None else 0.0
    dec = fit.decompose(m.weight, s.gram if whitened else None, cross=cross, eps=cfg.eps,
                        residual=res.cross if res is not None else None, prior=prior)
    a, b = dec.factors(rank)
    w_r = a @ b
    bias = m.bias
    if cfg.bias_correction and s is not None:
        shift = fit.bias_shift(m.weight, w_r, s.mean_ref, s.mean)
        if res is not None:
            shift = shift + res.total / max(s.count, 1)
        bias = shift if bias is None else bias + shift
    split_matrix(graph, m, a, b, bias)
    if s is None:
        return float(np.linalg.norm(m.weight - w_r) / max(np.linalg.norm(m.weight), 1e-30))
    return output_error(m, w_r, s, bias, res)


def output_error(m: Matrix, w_r: np.ndarray, s: InputStats, bias: np.ndarray | None,
                  res: ResidualStats | None = None) -> float:
    """||X' W_r + b' - (X W + b) - D|| / ||X W + b|| on the calibration tokens, from the
    second moments (X' = the compressed model's inputs, X = the original ones, D = the
    upstream error of the residual the output is added to; zero without ``res``)."""
    w, n = m.weight, s.count
    b0 = m.bias if m.bias is not None else np.zeros(m.d_out)
    b1 = bias if bias is not None else np.zeros(m.d_out)
    def trace(left, gram, right):  # tr(left^T gram right)
        return float(np.sum(left * (gram @ right)))

    new_sq = trace(w_r, s.gram, w_r) + 2 * (s.total @ w_r) @ b1 + n * b1 @ b1
    ref_sq = trace(w, s.gram_ref, w) + 2 * (s.total_ref @ w) @ b0 + n * b0 @ b0
    dot = trace(w_r, s.cross, w) + (s.total @ w_r) @ b0 + (s.total_ref @ w) @ b1 + n * b1 @ b0
    err_sq = new_sq - 2 * dot + ref_sq
    if res is not None:  # ||P - D||^2 = ||P||^2 - 2 <P, D> + ||D||^2 with P = X'W_r + b' - XW - b
        p_dot_d = float(np.sum(w_r * res.cross)) + b1 @ res.total - float(np.sum(w * res.cross_ref)) - b0 @ res.total
        err_sq += res.sq - 2 * p_dot_d
    return float(np.sqrt(max(err_sq, 0.0) / max(ref_sq, 1e-30)))
