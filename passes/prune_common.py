"""Shared pieces of the structured-pruning passes (``prune_heads``, ``prune_ffn``).

Both passes remove *groups of input features* of one linear layer -- the attention
output projection (a group = the context columns of one head, or of one KV group of
heads) or the FFN down projection (a group = one intermediate neuron) -- together with
whatever produces those features upstream. Post-training, in the spirit of Kwon et
al. 2022 ("A Fast Post-Training Pruning Framework for Transformers"):

1. *Statistics*: stream the calibration data once and keep, per layer, the Gram
   matrix of the projection's input ``X`` augmented with a ones column
   (``[X 1]^T [X 1]``: X^T X, the column sums and the token count). The layer's
   original output is ``Y = X W + b``, so every least-squares quantity below follows
   from that Gram and the weights; no activation is ever held.
2. *Scoring*: per layer, a greedy backward elimination orders the groups by how much
   the layer's output error grows when each is removed -- with repair, the increase
   of the ridge least-squares reconstruction error (optimal brain surgeon updates of
   the inverse Gram), without, the energy ``||X_S W_S||^2`` of what was removed. The
   naive baseline orders by the weight norm of the projection's rows.
3. *Global allocation*: every layer's cumulative error curve, normalised by the
   energy of the residual stream the layer writes into (so errors in different
   layers are comparable), is made convex and the budget is spent across layers in
   order of error per unit of cost (heads / neurons, parameters or MACs).
4. *Repair*: the projection's kept rows and bias are refitted by ridge least squares
   to reproduce the original output from the kept features.

Conventions: a linear layer computes ``Y = X @ W + b`` with ``W`` of shape
[d_in, d_out] (transposed storage is handled by the callers).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import onnx_ir as ir

from onnxpress.errors import OnnxpressError
from onnxpress.pass_infra import PassConfig

if TYPE_CHECKING:
    from onnxpress.analysis import Layer, Linear

# Ridge added to the diagonal of X^T X, relative to its mean diagonal: keeps the normal
# equations well posed for dead features and few tokens while leaving the fit of the
# well-conditioned directions untouched. Never applied to the bias (ones) column.
DEFAULT_RIDGE = 1e-4


# ------------------------------------------------------------------------ statistics


@dataclass
class AugmentedGram:
    """Streaming ``[X 1]^T [X 1]`` in float64: what every fit below needs.

    ``xtx`` = X^T X, ``xsum`` = column sums of X, ``count`` = rows (tokens)."""

    xtx: np.ndarray
    xsum: np.ndarray
    count: float

    @classmethod
    def empty(cls, dim: int) -> AugmentedGram:
        return cls(np.zeros((dim, dim)), np.zeros(dim), 0.0)

    @classmethod
    def of(cls, x: np.ndarray) -> AugmentedGram:
        g = cls.empty(x.shape[-1])
        g.update(x)
        return g

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x).reshape(-1, self.xtx.shape[0])
        x64 = x.astype(np.float64)
        self.xtx += x64.T @ x64
        self.xsum += x64.sum(0)
        self.count += x.shape[0]

    @property
    def dim(self) -> int:
        return self.xtx.shape[0]

    def matrix(self) -> np.ndarray:
        """The (d+1) x (d+1) Gram of [X 1]."""
        d = self.dim
        g = np.empty((d + 1, d + 1))
        g[:d, :d] = self.xtx
        g[:d, d] = g[d, :d] = self.xsum
        g[d, d] = self.count
        return 0.5 * (g + g.T)


def augment(weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """[W; b]: the (d_in+1) x d_out weight acting on [X 1]."""
    weight = np.asarray(weight, np.float64)
    b = np.zeros(weight.shape[1]) if bias is None else np.asarray(bias, np.float64).reshape(1, -1)
    return np.vstack([weight, b])


def output_energy(gram: AugmentedGram, weight: np.ndarray, bias: np.ndarray | None) -> float:
    """||X W + b||^2 over the calibration tokens, from the Gram alone."""
    w = augment(weight, bias)
    return float(np.einsum("ij,ij->", w, gram.matrix() @ w))


# ------------------------------------------------------------------ elimination order


@dataclass
class Elimination:
    """A layer's greedy removal path: ``order[k]`` is the k-th group removed and
    ``errors[k]`` the layer's output error (squared, summed over tokens) once the
    first k+1 groups are gone. ``errors`` is non-decreasing."""

    order: list[int]
    errors: np.ndarray


def _ridge_hessian(gram: AugmentedGram, ridge: float) -> np.ndarray:
    h = gram.matrix()
    d = gram.dim
    lam = ridge * max(float(np.mean(np.diag(gram.xtx))) if d else 0.0, 1e-12)
    h[np.arange(d), np.arange(d)] += lam
    # a calibration set with no tokens would leave the bias row empty
    h[d, d] = max(h[d, d], 1.0)
    return h


def _stable_inv(h: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive definite matrix from its Cholesky factor (LAPACK
    potrf/potri: half the work of a general inverse)."""
    from scipy.linalg import lapack

    jitter = 1e-10 * max(float(np.mean(np.diag(h))), 1e-12)
    for _ in range(8):  # a numerically indefinite Gram: grow the ridge until Cholesky succeeds
        c, info = lapack.dpotrf(h, lower=True)
        if info == 0:
            inv, info = lapack.dpotri(c, lower=True)
            if info == 0:
                inv = np.tril(inv) + np.tril(inv, -1).T
                return inv
        h = h + jitter * np.eye(len(h))
        jitter *= 100
    return np.linalg.pinv(h)


def eliminate_with_repair(
    gram: AugmentedGram,
    weight: np.ndarray,
    bias: np.ndarray | None,
    groups: list[np.ndarray],
    max_remove: int,
    *,
    ridge: float = DEFAULT_RIDGE,
    chunk: int = 1,
) -> Elimination:
    """Greedy backward elimination under least-squares repair (block OBS).

    With ``H`` the ridge-regularised Gram of [X 1], ``P = H^-1`` over the kept
    features and ``W`` the current least-squares solution, removing the feature set
    S and refitting the rest raises the error by ``tr(W_S^T (P_SS)^-1 W_S)`` and
    updates ``W -= P_:S P_SS^-1 W_S`` and ``P -= P_:S P_SS^-1 P_S:`` (exact, not an
    approximation). ``chunk`` > 1 removes that many of the cheapest single groups at
    once (for thousands of neurons); the recorded errors stay exact for the set.
    """
    h = _ridge_hessian(gram, ridge)
    p = _stable_inv(h)
    w = p @ (h @ augment(weight, bias))  # LS solution of the ridge problem (= [W; b] up to the ridge)
    remaining = list(range(len(groups)))
    order: list[int] = []
    errors: list[float] = []
    total = 0.0
    single = all(len(g) == 1 for g in groups)
    while len(order) < max_remove and remaining:
        if single:  # ||W_i||^2 / P_ii, vectorised
            idx = np.array([groups[g][0] for g in remaining])
            scores = (w[idx] ** 2).sum(1) / np.maximum(np.diag(p)[idx], 1e-300)
        else:
            scores = np.array([_block_cost(p, w, groups[g]) for g in remaining])
        take = min(chunk, max_remove - len(order), len(remaining))
        picked = [remaining[i] for i in np.argsort(scores, kind="stable")[:take]]
        s = np.concatenate([groups[g] for g in picked])
        total += _block_cost(p, w, s)
        p, w = _remove(p, w, s)
        for g in picked:
            remaining.remove(g)
            order.append(g)
            errors.append(total)  # within a chunk the set's error is shared by its members
    return Elimination(order, np.maximum.accumulate(np.asarray(errors, np.float64)) if errors else np.zeros(0))


def _block_cost(p: np.ndarray, w: np.ndarray, s: np.ndarray) -> float:
    pss = p[np.ix_(s, s)]
    ws = w[s]
    try:
        return float(np.einsum("ij,ij->", ws, np.linalg.solve(pss, ws)))
    except np.linalg.LinAlgError:
        return float(np.einsum("ij,ij->", ws, np.linalg.pinv(pss) @ ws))


def _remove(p: np.ndarray, w: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OBS update that drops features ``s``; their rows/columns become zero (kept in
    place so group indices stay valid)."""
    pss = p[np.ix_(s, s)]
    try:
        inv = np.linalg.inv(pss)
    except np.linalg.LinAlgError:
        inv = np.linalg.pinv(pss)
    ps = p[:, s]
    w -= ps @ (inv @ w[s])
    p -= ps @ (inv @ ps.T)  # in place: P is the big one (d+1 squared)
    p[s, :] = 0.0
    p[:, s] = 0.0
    w[s] = 0.0
    return p, w


def eliminate_without_repair(
    gram: AugmentedGram, weight: np.ndarray, groups: list[np.ndarray], max_remove: int
) -> Elimination:
    """Greedy elimination when nothing is refitted: removing the set S changes the
    output by ``X_S W_S``, so the error is ``tr(W_S^T G_SS W_S)``; the next group is
    the one that raises it least, cross terms with the already removed ones included."""
    w = np.asarray(weight, np.float64)
    g = gram.xtx
    removed_cols = np.zeros(g.shape[0], bool)
    remaining = list(range(len(groups)))
    order: list[int] = []
    errors: list[float] = []
    total = 0.0
    while len(order) < max_remove and remaining:
        # increment of adding group j: tr(W_j^T G_jj W_j) + 2 tr(W_j^T G_jS W_S)
        gs_ws = g[:, removed_cols] @ w[removed_cols] if removed_cols.any() else np.zeros_like(w)
        incs = []
        for j in remaining:
            cols = groups[j]
            own = float(np.einsum("ij,ij->", w[cols], g[np.ix_(cols, cols)] @ w[cols]))
            incs.append(own + 2.0 * float(np.einsum("ij,ij->", w[cols], gs_ws[cols])))
        best = int(np.argmin(incs))
        j = remaining.pop(best)
        total += incs[best]
        removed_cols[groups[j]] = True
        order.append(j)
        errors.append(max(total, 0.0))
    return Elimination(order, np.maximum.accumulate(np.asarray(errors, np.float64)) if errors else np.zeros(0))


def eliminate_by_weight_norm(weight: np.ndarray, groups: list[np.ndarray], max_remove: int) -> Elimination:
    """Naive baseline: smallest Frobenius norm of the group's projection rows first;
    the "errors" are the cumulative squared norms (no data involved)."""
    w = np.asarray(weight, np.float64)
    norms = np.array([float((w[g] ** 2).sum()) for g in groups])
    order = [int(i) for i in np.argsort(norms, kind="stable")[:max_remove]]
    return Elimination(order, np.cumsum(norms[order]))


# ---------------------------------------------------------------- global allocation


@dataclass
class LayerCurve:
    """One layer's candidate removals for the allocator: the elimination path, the cost
    saved by each removal (same unit as the budget) and the normaliser of its error."""

    elimination: Elimination
    unit_cost: float
    scale: float = 1.0  # errors are divided by this (the energy of the layer's residual stream)
    max_remove: int | None = None  # cap on removals (e.g. keep at least one head)

    def path(self) -> np.ndarray:
        n = len(self.elimination.order)
        if self.max_remove is not None:
            n = min(n, self.max_remove)
        return self.elimination.errors[:n] / (self.scale if self.scale > 0 else 1.0)


def allocate(curves: list[LayerCurve], budget: float) -> list[int]:
    """Removals per layer that save at least ``budget`` (as far as the caps allow) at
    the least total normalised error.

    Greedy on each layer's lower convex hull of (removals, error): a hull segment's
    slope is its error per unit cost, slopes rise along a layer's path, so taking
    segments in global slope order is the water-filling optimum for the convexified
    problem; inside the last segment single removals are taken until the budget is
    met. With ``budget <= 0`` nothing is removed.
    """
    counts = [0] * len(curves)
    if budget <= 0:
        return counts
    heap: list[tuple[float, int, int, int]] = []  # (slope, layer, seq, end of segment)
    segments = [_hull_segments(c.path()) for c in curves]
    for i, segs in enumerate(segments):
        if segs:
            end, slope = segs[0]
            heapq.heappush(heap, (slope / curves[i].unit_cost, i, 0, end))
    saved = 0.0
    while heap and saved < budget - 1e-9:
        _, i, seg, end = heapq.heappop(heap)
        while counts[i] < end and saved < budget - 1e-9:
            counts[i] += 1
            saved += curves[i].unit_cost
        if counts[i] == end and seg + 1 < len(segments[i]):
            nxt_end, slope = segments[i][seg + 1]
            heapq.heappush(heap, (slope / curves[i].unit_cost, i, seg + 1, nxt_end))
    return counts


def _hull_segments(errors: np.ndarray) -> list[tuple[int, float]]:
    """Lower convex hull of the points (k, errors[k-1]) with (0, 0) prepended, as
    (end count, slope per removal) segments with non-decreasing slopes."""
    pts = [(0, 0.0)] + [(k + 1, float(e)) for k, e in enumerate(errors)]
    hull: list[tuple[int, float]] = []
    for pt in pts:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            # drop the middle point when it lies on or above the chord
            if (y2 - y1) * (pt[0] - x1) >= (pt[1] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(pt)
    return [(x2, (y2 - y1) / (x2 - x1)) for (x1, y1), (x2, y2) in zip(hull, hull[1:], strict=False)]


def uniform_counts(curves: list[LayerCurve], fraction: float, totals: list[int]) -> list[int]:
    """The same share of every layer's groups (rounded), within each layer's cap."""
    out = []
    for c, total in zip(curves, totals, strict=True):
        cap = len(c.path())
        out.append(min(cap, int(round(fraction * total))))
    return out


# --------------------------------------------------------------------------- repair


def ridge_refit(
    gram: AugmentedGram,
    weight: np.ndarray,
    bias: np.ndarray | None,
    keep: np.ndarray,
    *,
    ridge: float = DEFAULT_RIDGE,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of W for the kept features and a new bias that best reproduce the original
    output ``X W + b`` from ``[X_keep 1]`` (ridge least squares).

    The normal equations come from the full Gram: with ``Xa = [X 1]``, the target's
    cross term is ``Xa_keep^T Xa [W; b] = G_keep,: [W; b]``, so no second pass over
    the data is needed. Returns (W_keep [k, d_out], b [d_out]).
    """
    keep = np.asarray(keep, dtype=np.int64)
    h = _ridge_hessian(gram, ridge)
    g = gram.matrix()
    rows = np.concatenate([keep, [gram.dim]])
    lhs = h[np.ix_(rows, rows)]
    rhs = g[rows] @ augment(weight, bias)
    try:
        c = np.linalg.cholesky(lhs)
        sol = np.linalg.solve(c.T, np.linalg.solve(c, rhs))
    except np.linalg.LinAlgError:
        sol = np.linalg.lstsq(lhs, rhs, rcond=None)[0]
    return sol[:-1], sol[-1]


# --------------------------------------------------------------------------- config


@dataclass
class PruneConfig(PassConfig):
    """Settings shared by prune_heads and prune_ffn (each adds its ``target`` choices)."""

    fraction: float = 0.25  # share of the target (heads/neurons, parameters or MACs) to remove
    score: str = "contribution"  # "contribution" (calibrated, output-aware) | "weight_norm" (naive)
    allocation: str = "global"  # "global": per-layer counts differ | "uniform": same share per layer
    repair: bool = True  # refit the projection by ridge least squares on calibration data
    ridge: float = DEFAULT_RIDGE  # relative to the mean diagonal of X^T X
    add_bias: bool = True  # a refit may add a bias to a projection that had none (mean correction)
    max_batches: int = 0  # calibration batches to use (0: all)

    targets: ClassVar[tuple[str, ...]] = ("params", "macs")
    scores: ClassVar[tuple[str, ...]] = ("contribution", "weight_norm")
    target: str = "params"

    def validate(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            self.fail("fraction", f"must be in [0, 1), e.g. 0.25; got {self.fraction}")
        if self.target not in self.targets:
            self.fail("target", f"must be one of {', '.join(self.targets)}; got {self.target!r}")
        if self.score not in self.scores:
            self.fail("score", f"must be one of {', '.join(self.scores)}; got {self.score!r}")
        if self.allocation not in ("global", "uniform"):
            self.fail("allocation", f"must be 'global' or 'uniform'; got {self.allocation!r}")
        if not 0.0 <= self.ridge < 1.0:
            self.fail("ridge", f"must be in [0, 1), e.g. 1e-4; got {self.ridge}")
        if self.max_batches < 0:
            self.fail("max_batches", f"must be 0 (all) or a positive number of batches; got {self.max_batches}")


# ---------------------------------------------------------------------- activations


class _Energy:
    """Accumulator (for ``onnxpress.activations.capture``): the squared norm of a tensor
    over real tokens."""

    def __init__(self, name: str):
        self.names = (name,)
        self.total = 0.0

    def update(self, rows: dict[str, np.ndarray]) -> None:
        r = rows[self.names[0]].astype(np.float64)
        self.total += float(np.einsum("ij,ij->", r, r))


@dataclass
class CapturedStats:
    grams: dict[str, AugmentedGram]
    energy: dict[str, float]


def capture_stats(
    model: ir.Model,
    batches: Iterable[dict[str, np.ndarray]],
    grams: Sequence[str],
    energies: Sequence[str] = (),
    *,
    threads: int | None = None,
) -> CapturedStats:
    """Stream ``batches`` through ``model`` once (one batch of activations alive at a
    time), accumulating the Gram of each value in ``grams`` and the squared norm of each
    in ``energies`` over real (unpadded) tokens."""
    from onnxpress.activations import GramStats, capture

    gram_accs = {n: GramStats(n) for n in dict.fromkeys(grams)}
    energy_accs = {n: _Energy(n) for n in dict.fromkeys(energies)}
    accs = [*gram_accs.values(), *energy_accs.values()]
    if accs:
        capture(model, None, list(batches), accs, threads=threads, desc="pruning statistics")
    return CapturedStats(
        grams={n: AugmentedGram(a.xtx, a.sum, float(a.count)) for n, a in gram_accs.items() if a.xtx is not None},
        energy={n: a.total for n, a in energy_accs.items()},
    )


def probe_shapes(
    model: ir.Model, values: Sequence[ir.Value], feeds: dict[str, np.ndarray], *, threads: int | None = None
) -> dict[str, tuple[int, ...]]:
    """Run-time shapes of ``values`` on one batch (for facts static shapes do not give)."""
    import onnx

    from onnxpress.model_io import model_proto
    from onnxpress.runtime import make_session, session_feeds

    names = list(dict.fromkeys(v.name for v in values))
    if not names:
        return {}
    proto = model_proto(model)
    present = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    session = make_session(proto.SerializeToString(), threads=threads)
    arrays = session.run(names, session_feeds(session, feeds))
    return {n: tuple(a.shape) for n, a in zip(names, arrays, strict=True)}


def calibration_batches(ctx, pass_name: str, max_batches: int) -> list[dict[str, np.ndarray]]:
    calib = ctx.require_calibration(pass_name)
    batches = list(calib.batches)
    return batches[:max_batches] if max_batches else batches


def residual_output(linear: Linear, layer: Layer) -> ir.Value | None:
    """The residual stream right after ``linear``'s output is added to it: the value
    whose energy normalises this layer's errors (None when not found)."""
    from onnxpress.analysis.graph_utils import consumers, is_constant

    residual_ids = {id(n) for n in layer.residual_adds}
    frontier = [linear.output]
    for _ in range(4):  # through a bias Add, Dropout, Cast, Reshape
        nxt = []
        for value in frontier:
            for node in consumers(value):
                if id(node) in residual_ids:
                    return node.outputs[0]
                if node.op_type == "Add" and not any(is_constant(v) for v in node.inputs):
                    return node.outputs[0]
                if node.op_type in ("Add", "Dropout", "Cast", "Reshape", "Identity"):
                    nxt.append(node.outputs[0])
        frontier = nxt
    return None


# ------------------------------------------------------------------- graph editing


class GraphEditor:
    """Replaces constants of a graph without disturbing other users of shared ones:
    a constant used only by the nodes being edited is changed in place, otherwise a
    new initializer is created for those nodes."""

    def __init__(self, model: ir.Model):
        self.model = model
        self.graph = model.graph
        self._names = {v.name for n in self.graph for v in (*n.inputs, *n.outputs) if v is not None}
        self._names |= set(self.graph.initializers)
        self._names |= {v.name for v in self.graph.inputs}

    def fresh_name(self, base: str) -> str:
        i = 0
        while f"{base}_pruned{i}" in self._names:
            i += 1
        name = f"{base}_pruned{i}"
        self._names.add(name)
        return name

    def set_constant(self, value: ir.Value, array: np.ndarray, users: Iterable[ir.Node] | None = None) -> ir.Value:
        """Give ``value``'s readers among ``users`` (all readers when None) the data ``array``.

        ``value`` may also be computed from constants (folded shape arithmetic): its
        readers then get a new initializer."""
        user_ids = None if users is None else {id(n) for n in users}
        uses = list(value.uses())
        mine = [u for u in uses if user_ids is None or id(u.node) in user_ids]
        if not mine and user_ids is not None:
            mine = uses  # value reached only through nodes the caller did not list: it is theirs
        producer = value.producer()
        tensor = ir.tensor(np.ascontiguousarray(array))
        editable = value.is_initializer() or (producer is not None and producer.op_type == "Constant")
        if editable and len(mine) == len(uses) and not value.is_graph_output():
            if producer is not None and producer.op_type == "Constant":
                for key in [k for k in producer.attributes if k.startswith("value")]:
                    del producer.attributes[key]
                producer.attributes["value"] = ir.AttrTensor("value", tensor)
            else:
                value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)
            value.shape = ir.Shape(array.shape)
            return value
        new = ir.Value(name=self.fresh_name(value.name or "const"), shape=ir.Shape(array.shape),
                       type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
        new.const_value = ir.tensor(np.ascontiguousarray(array), name=new.name)
        self.graph.register_initializer(new)
        for use in mine:
            use.node.replace_input_with(use.idx, new)
        return new


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    from onnxpress.analysis.graph_utils import constant_tensor

    tensor = constant_tensor(value)
    return None if tensor is None else tensor.numpy()


def _check_plain(linear: Linear) -> None:
    if linear.node.op_type not in ("MatMul", "Gemm", "Attention", "FusedMatMul") or any(
        n.op_type in ("DequantizeLinear", "Reshape") for n in linear.weight_via
    ):
        raise OnnxpressError(
            f"cannot prune {linear.name} ({linear.node.op_type}): its weight is quantized or reshaped; "
            "run the pruning passes before quantization"
        )


def read_weight(linear: Linear) -> np.ndarray:
    """The weight as [d_in, d_out] float64."""
    _check_plain(linear)
    w = constant_array(linear.weight)
    if w is None:
        raise OnnxpressError(f"cannot read the weight of {linear.name} (please report this bug)")
    w = w.astype(np.float64)
    return w.T if linear.transposed else w


def read_bias(linear: Linear) -> np.ndarray | None:
    b = constant_array(linear.bias)
    return None if b is None else b.astype(np.float64).reshape(-1)


def write_linear(
    editor: GraphEditor,
    linear: Linear,
    weight: np.ndarray,
    bias: np.ndarray | None,
    *,
    add_bias: bool = False,
) -> None:
    """Store ``weight`` ([d_in', d_out']) and ``bias`` into ``linear`` (same dtypes and
    layout as before). A bias given for a layer without one is added as an ``Add``
    only when ``add_bias``; otherwise it is dropped."""
    old = constant_array(linear.weight)
    stored = weight.T if linear.transposed else weight
    users = [linear.node, *linear.weight_via]
    editor.set_constant(linear.weight, stored.astype(old.dtype), users)
    if bias is None:
        return
    if linear.bias is not None:
        old_b = constant_array(linear.bias)
        lead = (1,) * (old_b.ndim - 1)
        users = [linear.bias_node] if linear.bias_node is not None else [linear.node]
        editor.set_constant(linear.bias, bias.reshape(*lead, -1).astype(old_b.dtype), users)
    elif add_bias and np.any(bias != 0):
        _append_bias(editor, linear, bias.astype(old.dtype))


def _append_bias(editor: GraphEditor, linear: Linear, bias: np.ndarray) -> None:
    out = linear.output
    uses = list(out.uses())
    b = ir.Value(name=editor.fresh_name(f"{linear.name}.bias"), shape=ir.Shape(bias.shape),
                 type=ir.TensorType(ir.DataType.from_numpy(bias.dtype)))
    b.const_value = ir.tensor(bias, name=b.name)
    editor.graph.register_initializer(b)
    add = ir.node("Add", [out, b], name=editor.fresh_name(f"{linear.name}/bias_add"))
    add.outputs[0].name = editor.fresh_name(f"{out.name}_biased")
    add.outputs[0].type = ir.TensorType(ir.DataType.from_numpy(bias.dtype))
    editor.graph.insert_after(out.producer(), add)
    for use in uses:
        use.node.replace_input_with(use.idx, add.outputs[0])
    if out.is_graph_output():
        outputs = editor.graph.outputs
        outputs[outputs.index(out)] = add.outputs[0]


def clear_shapes(values: Iterable[ir.Value]) -> None:
    """Forget recorded shapes that slicing made stale (graph inputs/outputs excluded):
    ONNX Runtime trusts value_info and would reject the mismatch."""
    for value in values:
        if value is not None and not value.is_graph_input() and not value.is_graph_output() \
                and not value.is_initializer():
            value.shape = None


def region_between(starts: Sequence[ir.Value], stop: ir.Node) -> list[ir.Node]:
    """Nodes on the data paths from ``starts`` into ``stop``: downstream of the starts
    and upstream of ``stop``'s inputs. (Shape side branches that read a value on the
    way but lead past ``stop``, e.g. GPT-2's output-reshape target, are excluded.)"""
    from onnxpress.analysis.graph_utils import ancestors, walk_down

    start_ids = {id(v.producer()) for v in starts}
    upstream = ancestors([v for v in stop.inputs if v is not None], stop=lambda n: id(n) in start_ids)
    up_ids = {id(n) for n in upstream}
    forward = walk_down(list(starts), lambda n: n is not stop and id(n) in up_ids, limit=20_000)
    return [n for n in forward if id(n) in up_ids]


def write_shape(editor: GraphEditor, value: ir.Value, old: list, new: list, users: list[ir.Node]) -> None:
    """Write the changed elements of a 1-D shape tensor back into the constants it is
    built from (a constant, a Concat of pieces, an Unsqueeze/Cast of a constant).
    Pieces computed at run time (``Shape`` of a tensor) are already right."""
    from onnxpress.analysis.graph_utils import const_array, shape_elements

    arr = const_array(value)
    if arr is not None:
        editor.set_constant(value, np.asarray(new, dtype=arr.dtype).reshape(arr.shape), users)
        return
    node = value.producer()
    if node is None:
        return
    if node.op_type == "Concat":
        off = 0
        for piece in node.inputs:
            part = shape_elements(piece)
            if part is None:
                raise OnnxpressError(f"cannot patch the shape built by {node.name} (please report this bug)")
            n = len(part)
            if old[off:off + n] != new[off:off + n]:
                write_shape(editor, piece, old[off:off + n], new[off:off + n], [node])
            off += n
    elif node.op_type in ("Unsqueeze", "Cast", "Identity", "Squeeze") and const_array(node.inputs[0]) is not None:
        src_arr = const_array(node.inputs[0])
        editor.set_constant(node.inputs[0], np.asarray(new, dtype=src_arr.dtype).reshape(src_arr.shape), [node])


def group_columns(indices: Iterable[int], width: int, offset: int = 0) -> np.ndarray:
    idx = [offset + i * width + j for i in indices for j in range(width)]
    return np.asarray(idx, dtype=np.int64)
