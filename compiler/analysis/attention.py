"""Find attention blocks by dataflow.

Decomposed attention is anchored on each ``Softmax``: walking up from it (through
mask ``Add``/``Where`` and scaling ``Mul``/``Div``) must reach a MatMul of two
non-constant operands (the scores, ``q @ k^T``); walking down (through ``Cast``/
NaN guards) must reach the context MatMul (``p @ v``). From the three operands the
walk goes up through "transparent" ops - head split/merge (Reshape/Transpose),
repeat-KV (Expand/Tile/Concat), KV-cache Concat, rotary (Mul/Add/Neg/Slice/Concat
with cos/sin), per-head norms and scaling - to the nearest constant-weight
projection. From the context MatMul it goes down through layout ops to the output
projection. No node names or fixed parent paths are used, so torch.onnx
(TorchScript and dynamo), optimum and hand-written graphs match alike.

Fused nodes (com.microsoft Attention / MultiHeadAttention / GroupQueryAttention,
ONNX ``Attention`` (opset 23) and ``onnxpress.Attention``) are read from their
attributes and inputs, with the projections found the same way.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxpress.analysis.graph_utils import (
    ELEMENTWISE_OPS,
    FUSED_NORM_OPS,
    LAYOUT_OPS,
    UpWalk,
    _attr,
    const_array,
    const_scalar,
    consumers,
    is_constant,
    producer,
    shape_elements,
    walk_to_linears,
)
from onnxpress.analysis.linear import as_linear
from onnxpress.analysis.structures import Attention, Linear

FUSED_ATTENTION = {
    ("com.microsoft", "Attention"): "com.microsoft.Attention",
    ("com.microsoft", "MultiHeadAttention"): "com.microsoft.MultiHeadAttention",
    ("com.microsoft", "GroupQueryAttention"): "com.microsoft.GroupQueryAttention",
    ("com.microsoft", "PackedMultiHeadAttention"): "com.microsoft.MultiHeadAttention",
    ("", "Attention"): "Attention",
    ("ai.onnx", "Attention"): "Attention",
    ("onnxpress", "Attention"): "onnxpress.Attention",
}

# Ops crossed when walking from the scores/context operands up to the projections.
_RMS_PARTS = frozenset({"Pow", "ReduceMean", "Sqrt", "Reciprocal", "ReduceSumSquare", "ReduceL2"})
_UP_OPS = (
    LAYOUT_OPS
    | ELEMENTWISE_OPS
    | _RMS_PARTS
    | FUSED_NORM_OPS
    | {"Expand", "Tile", "Concat", "Split", "Slice", "Gather", "RotaryEmbedding", "IsNaN"}
)
_ROTARY_OPS = frozenset({"RotaryEmbedding", "Cos", "Sin"})
# Ops crossed between the Softmax and the scores MatMul.
_SCORE_OPS = frozenset(
    {
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Where",
        "Cast",
        "Identity",
        "Reshape",
        "Max",
        "Min",
        "Clip",
        "Squeeze",
        "Unsqueeze",
    }
)
# Ops crossed between the Softmax and the context MatMul.
_PROB_OPS = frozenset({"Cast", "Identity", "Dropout", "Where", "Reshape", "Squeeze", "Unsqueeze"})
# Ops crossed from the context MatMul (or fused output) down to the output projection.
_CTX_OPS = LAYOUT_OPS | {"Concat"}
_CAUSAL_COMPARE = frozenset({"Less", "LessOrEqual", "Greater", "GreaterOrEqual"})


class LinearIndex:
    """Every constant-weight projection of the graph, by node and by output value."""

    def __init__(self, graph: ir.Graph):
        self.by_node: dict[int, Linear] = {}
        self.by_value: dict[int, Linear] = {}
        self.ordered: list[Linear] = []
        for node in graph:
            lin = as_linear(node)
            if lin is None:
                continue
            self.by_node[id(node)] = lin
            self.ordered.append(lin)
            self.by_value[id(node.outputs[0])] = lin
            self.by_value[id(lin.output)] = lin

    def for_value(self, value: ir.Value | None) -> Linear | None:
        return None if value is None else self.by_value.get(id(value))

    def for_node(self, node: ir.Node | None) -> Linear | None:
        return None if node is None else self.by_node.get(id(node))


@dataclass
class _Trace(UpWalk):
    """What a walk from an attention operand up to its projection found."""

    fused_rotary: bool = False

    @property
    def linear(self) -> Linear | None:
        return self.linears[0] if self.linears else None


def _trace_up(start: ir.Value, index: LinearIndex, limit: int = 400) -> _Trace:
    """Walk from an attention operand up to the constant-weight projection(s)."""
    walk = walk_to_linears(start, index.for_value, lambda n: _follow(n) if n.op_type in _UP_OPS else None, limit)
    fused_rotary = any(n.op_type == "RotaryEmbedding" for n in walk.nodes)
    return _Trace(walk.linears, walk.graph_inputs, walk.nodes, walk.foreign, fused_rotary)


def _follow(node: ir.Node) -> list[ir.Value]:
    op = node.op_type
    ins = node.inputs
    if op in ("Concat",) or op in ELEMENTWISE_OPS and op != "Where":
        return [v for v in ins if v is not None and not is_constant(v)]
    if op == "Where":
        return [v for v in ins[1:] if v is not None and not is_constant(v)]
    if op == "Gather" and is_constant(ins[0]):
        return []  # a lookup table (embedding, cos/sin cache), not the projected tensor
    return [ins[0]] if ins and ins[0] is not None else []


# ---------------------------------------------------------------- decomposed


@dataclass
class _Scores:
    matmul: ir.Node
    path: list[ir.Node]
    factors: list[float]  # constant multipliers applied to the scores
    dynamic_scale: bool  # a non-constant multiplier (SDPA's sqrt(1/sqrt(d)) from a Shape)
    masks: list[ir.Value]
    conditions: list[ir.Value]


def _is_scores_matmul(node: ir.Node) -> bool:
    if (
        node.op_type == "MatMul"
        and node.domain in ("", "ai.onnx")
        or (node.op_type == "FusedMatMul" and node.domain == "com.microsoft")
    ):
        return all(v is not None and not is_constant(v) for v in node.inputs[:2])
    return False


def _find_scores(value: ir.Value, depth: int = 0) -> _Scores | None:
    node = producer(value)
    if node is None or depth > 16:
        return None
    if _is_scores_matmul(node):
        factors = [float(_attr(node, "alpha", 1.0))] if node.op_type == "FusedMatMul" else []
        return _Scores(node, [], factors, False, [], [])
    op = node.op_type
    if op not in _SCORE_OPS or node.domain not in ("", "ai.onnx"):
        return None
    ins = [v for v in node.inputs]
    if op in ("Mul", "Div"):
        for i, v in enumerate(ins[:2]):
            if v is None or is_constant(v):
                continue
            found = _find_scores(v, depth + 1)
            if found is None:
                continue
            other = ins[1 - i]
            c = const_scalar(other)
            if c is not None:
                found.factors.append(c if op == "Mul" else 1.0 / c)
            elif other is not None:
                found.dynamic_scale = True
            found.path.append(node)
            return found
        return None
    if op in ("Add", "Sub"):
        for i, v in enumerate(ins[:2]):
            if v is None or is_constant(v):
                continue
            found = _find_scores(v, depth + 1)
            if found is not None:
                other = ins[1 - i]
                if other is not None:
                    found.masks.append(other)
                found.path.append(node)
                return found
        return None
    if op == "Where":
        for i in (1, 2):
            v = ins[i]
            if v is None or is_constant(v):
                continue
            found = _find_scores(v, depth + 1)
            if found is not None:
                found.conditions.append(ins[0])
                other = ins[3 - i]
                if other is not None and not is_constant(other):
                    found.masks.append(other)
                found.path.append(node)
                return found
        return None
    found = _find_scores(ins[0], depth + 1) if ins and ins[0] is not None else None
    if found is not None:
        found.path.append(node)
    return found


def _find_context(softmax: ir.Node) -> tuple[ir.Node | None, list[ir.Node]]:
    """The MatMul that applies the probabilities to V, and the nodes crossed."""
    crossed: list[ir.Node] = []
    queue = deque([softmax.outputs[0]])
    seen: set[int] = set()
    while queue:
        value = queue.popleft()
        for node in consumers(value):
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type == "MatMul" and node.inputs[0] is value and not is_constant(node.inputs[1]):
                return node, crossed
            if node.op_type == "IsNaN":
                crossed.append(node)
                continue
            if node.op_type in _PROB_OPS and (node.op_type != "Where" or value is not node.inputs[0]):
                crossed.append(node)
                queue.extend(node.outputs)
    return None, crossed


def _find_output_projection(start: ir.Value, index: LinearIndex) -> tuple[Linear | None, list[ir.Node]]:
    crossed: list[ir.Node] = []
    queue = deque([start])
    seen: set[int] = set()
    while queue:
        value = queue.popleft()
        for node in consumers(value):
            if id(node) in seen or node.op_type == "Shape":
                continue
            seen.add(id(node))
            lin = index.for_node(node)
            if lin is not None and lin.input is value:
                return lin, crossed
            if node.op_type in _CTX_OPS:
                crossed.append(node)
                queue.extend(node.outputs[:1])
    return None, crossed


class AttentionFinder:
    """Finds every attention block of one graph (decomposed and fused)."""

    def __init__(self, graph: ir.Graph, index: LinearIndex):
        self.graph = graph
        self.index = index
        self.notes: list[str] = []
        self._order: dict[int, int] | None = None

    # ------------------------------------------------------------------ entry

    def find(self) -> list[Attention]:
        found: list[Attention] = []
        for node in self.graph:
            key = (node.domain, node.op_type)
            if node.op_type == "Softmax" and node.domain in ("", "ai.onnx"):
                att = self._decomposed(node)
                if att is not None:
                    found.append(att)
            elif key in FUSED_ATTENTION:
                att = self._fused(node, FUSED_ATTENTION[key])
                if att is not None:
                    found.append(att)
        return found

    # ------------------------------------------------------------ decomposed

    def _decomposed(self, softmax: ir.Node) -> Attention | None:
        where = f"Softmax {softmax.name or '?'}"
        scores = _find_scores(softmax.inputs[0])
        if scores is None:
            self.notes.append(f"{where}: not attention (no q@k MatMul of two activations feeds it)")
            return None
        context, prob_nodes = _find_context(softmax)
        if context is None:
            self.notes.append(f"{where}: scores found but no probabilities@V MatMul after it")
            return None
        q_tr = _trace_up(scores.matmul.inputs[0], self.index)
        k_tr = _trace_up(scores.matmul.inputs[1], self.index)
        v_tr = _trace_up(context.inputs[1], self.index)
        o, ctx_nodes = _find_output_projection(context.outputs[0], self.index)
        q, k, v = q_tr.linear, k_tr.linear, v_tr.linear
        if q is None or k is None or v is None:
            missing = [n for n, lin in (("Q", q), ("K", k), ("V", v)) if lin is None]
            self.notes.append(
                f"{where}: attention-like, but no constant-weight {'/'.join(missing)} projection found"
            )
            return None
        for name, tr in (("Q", q_tr), ("K", k_tr), ("V", v_tr)):
            if len(tr.linears) > 1:
                self.notes.append(
                    f"{where}: {len(tr.linears)} projections reach the {name} operand; using {tr.linear.name}"
                )
        if o is None:
            self.notes.append(f"{where}: no output projection after the context MatMul")
        packed = q is k or q is v
        qkv = q if packed else None

        # scale and head geometry
        q_only = self._path_nodes(q_tr, q)
        k_only = self._path_nodes(k_tr, k)
        factors = list(scores.factors)
        dynamic = scores.dynamic_scale
        for node in q_only + k_only:
            f, dyn = _scale_factor(node)
            if f is not None:
                factors.append(f)
            dynamic = dynamic or dyn
        scale = float(np.prod(factors)) if factors else 1.0
        scale_source = "default" if dynamic else "constant" if factors else "none"
        heads = self._head_geometry(q, k, v, packed, q_tr, k_tr, scores, scale, scale_source, where)
        if heads is None:
            return None
        num_heads, num_kv_heads, head_size, layout = heads
        if dynamic:  # SDPA's 1/sqrt(head_size), split as sqrt over q and k; constants multiply in
            scale = scale / math.sqrt(head_size)

        past_k = _first_past(k_tr)
        past_v = _first_past(v_tr)
        present_k = _present(k_tr)
        present_v = _present(v_tr)
        masks = [m for m in scores.masks if m is not None] + [c for c in scores.conditions if c is not None]
        causal = self._is_causal(scores)
        rotary = self._is_rotary(q_tr, q)

        projections = [p for p in (q, k, v) if p is not None]
        core = self._core_nodes(projections, o, context)
        att = Attention(
            layer=-1,
            kind="decomposed",
            q=None if packed else q,
            k=None if packed else k,
            v=None if packed else v,
            qkv=qkv,
            o=o,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_size=head_size,
            scale=scale,
            causal=causal,
            mask=masks[0] if masks else None,
            rotary=rotary,
            softmax=softmax,
            scores_matmul=scores.matmul,
            context_matmul=context,
            fused_node=None,
            past_key=past_k,
            past_value=past_v,
            present_key=present_k,
            present_value=present_v,
            nodes=core,
            scale_source=scale_source,
            qkv_layout=layout,
        )
        att.head_shape_nodes, att.head_shape_values = _head_shape_nodes(core, att)
        return att

    def _path_nodes(self, trace: _Trace, lin: Linear) -> list[ir.Node]:
        """Crossed nodes that are downstream of the projection ``lin`` (excludes the
        cos/sin and shape side branches the walk also entered)."""
        down: set[int] = set()
        queue = deque([lin.output])
        crossed = {id(n) for n in trace.nodes}
        while queue:
            value = queue.popleft()
            for node in consumers(value):
                if id(node) in crossed and id(node) not in down:
                    down.add(id(node))
                    queue.extend(node.outputs)
        return [n for n in trace.nodes if id(n) in down]

    def _head_geometry(self, q, k, v, packed, q_tr, k_tr, scores, scale, scale_source, where):
        """(num_heads, num_kv_heads, head_size, qkv_layout) from the evidence: scale,
        head-split Reshape constants and static shapes; None when inconsistent."""
        q_nodes = self._path_nodes(q_tr, q)
        d_scale = None
        if scale_source == "constant" and scale > 0:
            d = 1.0 / (scale * scale)
            if abs(d - round(d)) < 1e-3 * d and round(d) >= 1:
                d_scale = int(round(d))
        heads_r, d_r = _reshape_heads(q_nodes, q.d_out)
        d_static = _static_last_dim(scores.matmul.inputs[0])
        heads_static = _static_dim(scores.matmul.inputs[0], 1)
        if packed:
            total = q.d_out
            q_size, k_size = _split_size(q_nodes, q), _split_size(self._path_nodes(k_tr, k), k)
        else:
            total = None
            q_size, k_size = q.d_out, k.d_out
        ref = q_size or total
        candidates = []
        if d_scale and d_r and d_r % d_scale == 0:
            candidates.append(d_scale)
        candidates += [d_static, d_r, d_scale]
        head_size = None
        for c in candidates:
            if c and c > 0 and (ref is None or ref % c == 0):
                head_size = c
                break
        if head_size is None:
            self.notes.append(f"{where}: cannot determine the head size (scale {scale:g}, reshape {d_r})")
            return None
        layout = None
        if not packed:
            num_heads = q_size // head_size
            num_kv = k_size // head_size
        elif q_size and k_size:
            num_heads, num_kv = q_size // head_size, k_size // head_size
            layout = "blocks"
        elif d_r and d_r == 3 * head_size and total % d_r == 0:
            # [b, s, heads, 3 * head_size]: per-head q|k|v (GPT-NeoX, BLOOM)
            num_heads = num_kv = total // d_r
            layout = "interleaved"
        else:
            h = heads_r if heads_r and heads_r > 0 else heads_static
            layout = "blocks"
            if h:
                num_heads = h
                num_kv = (total // head_size - h) // 2
            elif total % (3 * head_size) == 0:
                num_heads = num_kv = total // (3 * head_size)
                self.notes.append(f"{where}: packed QKV split not readable; assuming equal Q/K/V thirds")
            else:
                self.notes.append(f"{where}: packed QKV projection without a readable head split")
                return None
        if heads_r and heads_r > 0 and heads_r != num_heads and not packed:
            self.notes.append(
                f"{where}: head-split Reshape says {heads_r} heads, projection size says {num_heads}"
            )
        if num_heads <= 0 or num_kv <= 0:
            self.notes.append(f"{where}: inconsistent head counts ({num_heads} heads, {num_kv} KV heads)")
            return None
        return num_heads, num_kv, head_size, layout

    def _is_causal(self, scores: _Scores) -> bool:
        sources = list(scores.masks) + list(scores.conditions)
        return any(_mask_is_causal(v) for v in sources)

    def _is_rotary(self, trace: _Trace, lin: Linear) -> bool:
        if trace.fused_rotary:
            return True
        path = self._path_nodes(trace, lin)
        path_ids = {id(n) for n in path}
        path_values = {id(o) for n in path for o in n.outputs} | {id(lin.output)}
        for node in path:
            if node.op_type != "Mul":
                continue
            for v in node.inputs:
                if v is None or id(v) in path_values:
                    continue
                if _has_ancestor(v, _ROTARY_OPS, limit=60, avoid=path_ids):
                    return True
                arr = const_array(v) if is_constant(v) else None
                if arr is not None and arr.size > 1 and arr.ndim >= 2:
                    return True  # cos/sin folded to constants
        return False

    def _core_nodes(self, projections: list[Linear], o: Linear | None, last: ir.Node) -> list[ir.Node]:
        """Nodes downstream of the Q/K/V projections and upstream of the output
        projection (or of ``last`` when there is none)."""
        stop = {id(o.node)} if o is not None else set()
        starts = [p.output for p in projections]
        down: dict[int, ir.Node] = {}
        queue = deque(starts)
        while queue and len(down) < 5000:
            value = queue.popleft()
            for node in consumers(value):
                if id(node) in down or id(node) in stop or self.index.for_node(node) is not None:
                    continue
                down[id(node)] = node
                queue.extend(node.outputs)
        target = o.input if o is not None else last.outputs[0]
        core: dict[int, ir.Node] = {}
        queue = deque([target])
        while queue:
            value = queue.popleft()
            node = producer(value)
            if node is None or id(node) in core or id(node) not in down:
                continue
            core[id(node)] = node
            queue.extend(v for v in node.inputs if v is not None)
        if self._order is None:
            self._order = {id(n): i for i, n in enumerate(self.graph)}
        order = self._order
        return sorted(core.values(), key=lambda n: order.get(id(n), 0))

    # ------------------------------------------------------------------ fused

    def _fused(self, node: ir.Node, kind: str) -> Attention | None:
        where = f"{kind} {node.name or '?'}"
        ins = list(node.inputs) + [None] * 10
        o, _ = _find_output_projection(node.outputs[0], self.index)
        q = k = v = qkv = None
        mask = past_k = past_v = None
        rotary = False
        causal = False
        scale = float(_attr(node, "scale", 0.0) or 0.0)
        num_heads = int(_attr(node, "num_heads", 0) or _attr(node, "q_num_heads", 0) or 0)
        num_kv = int(_attr(node, "kv_num_heads", 0) or 0)
        head_size = 0
        if kind == "com.microsoft.Attention":
            w = ins[1]
            from onnxpress.analysis.graph_utils import tensor_shape

            shape = tensor_shape(w)
            if shape is None or len(shape) != 2:
                self.notes.append(f"{where}: packed weights are not a constant matrix")
                return None
            qkv = Linear(
                node=node,
                weight=w,
                bias=ins[2],
                bias_node=None,
                d_in=shape[0],
                d_out=shape[1],
                transposed=False,
                input=ins[0],
                output=node.outputs[0],
            )
            sizes = _attr(node, "qkv_hidden_sizes", None)
            q_size, k_size = (int(sizes[0]), int(sizes[1])) if sizes else (shape[1] // 3, shape[1] // 3)
            head_size = q_size // max(num_heads, 1)
            num_kv = k_size // max(head_size, 1)
            mask = ins[3]
            past_k = ins[4] if ins[4] is not None and ins[4].is_graph_input() else None
            causal = bool(_attr(node, "unidirectional", 0))
        else:
            if kind == "com.microsoft.GroupQueryAttention":
                q_in, k_in, v_in = ins[0], ins[1], ins[2]
                past_k, past_v = ins[3], ins[4]
                causal = True
                rotary = bool(_attr(node, "do_rotary", 0))
            elif kind == "com.microsoft.MultiHeadAttention":
                q_in, k_in, v_in = ins[0], ins[1], ins[2]
                mask = ins[4] if ins[4] is not None else ins[5]
                past_k, past_v = ins[6], ins[7]
                causal = bool(_attr(node, "unidirectional", 0))
            else:  # ONNX Attention / onnxpress.Attention
                q_in, k_in, v_in = ins[0], ins[1], ins[2]
                mask = ins[3]
                past_k, past_v = ins[4], ins[5]
                causal = bool(_attr(node, "is_causal", 0) or _attr(node, "causal", 0))
            q_tr = _trace_up(q_in, self.index)
            q = q_tr.linear
            rotary = rotary or (q is not None and self._is_rotary(q_tr, q))
            if k_in is None:  # packed QKV in the query input
                qkv, q = q, None
                if qkv is None:
                    self.notes.append(f"{where}: packed QKV input without a constant-weight projection")
                    return None
                if not num_kv:
                    num_kv = num_heads
                head_size = qkv.d_out // (num_heads + 2 * num_kv)
            else:
                k_tr, v_tr = _trace_up(k_in, self.index), _trace_up(v_in, self.index)
                k, v = k_tr.linear, v_tr.linear
                past_k = past_k or _first_past(k_tr)
                past_v = past_v or _first_past(v_tr)
                if q is None or k is None or v is None:
                    self.notes.append(f"{where}: fused attention without constant-weight Q/K/V projections")
                    return None
                if q is k:
                    qkv, q, k, v = q, None, None, None
                    if not num_kv:
                        num_kv = num_heads
                    head_size = qkv.d_out // (num_heads + 2 * num_kv)
                else:
                    if not num_heads:  # 4-D inputs: heads from the head split before the node
                        heads_r, d_r = _reshape_heads(self._path_nodes(q_tr, q), q.d_out)
                        d = d_r or _static_last_dim(q_in)
                        num_heads = heads_r or (q.d_out // d if d and q.d_out % d == 0 else 0)
                    if not num_heads:
                        self.notes.append(f"{where}: no head count attribute or head-split Reshape")
                        return None
                    head_size = q.d_out // num_heads
                    num_kv = num_kv or k.d_out // head_size
        if head_size <= 0 or num_heads <= 0:
            self.notes.append(f"{where}: cannot determine head geometry")
            return None
        scale_source = "attribute" if scale else "default"
        if not scale:
            scale = 1.0 / math.sqrt(head_size)
        if mask is not None and (mask.is_graph_input() is False and is_constant(mask)):
            mask = None
        present_k = node.outputs[1] if len(node.outputs) > 1 and node.outputs[1] is not None else None
        present_v = node.outputs[2] if len(node.outputs) > 2 and node.outputs[2] is not None else None
        if kind == "com.microsoft.Attention":
            present_k, present_v = present_k, None
        if not causal and mask is not None:
            causal = _mask_is_causal(mask)
        att = Attention(
            layer=-1,
            kind=kind,
            q=q,
            k=k,
            v=v,
            qkv=qkv,
            o=o,
            num_heads=num_heads,
            num_kv_heads=num_kv or num_heads,
            head_size=head_size,
            scale=scale,
            causal=causal,
            mask=mask,
            rotary=rotary,
            fused_node=node,
            past_key=past_k if past_k is not None and past_k.is_graph_input() else None,
            past_value=past_v if past_v is not None and past_v.is_graph_input() else None,
            present_key=present_k if present_k is not None and present_k.is_graph_output() else None,
            present_value=present_v if present_v is not None and present_v.is_graph_output() else None,
            scale_source=scale_source,
            qkv_layout="blocks" if qkv is not None else None,
        )
        projections = [p for p in (q, k, v) if p is not None and p.node is not node]
        att.nodes = self._core_nodes(projections, o, node) if projections else [node]
        if node not in att.nodes:
            att.nodes.append(node)
        att.head_shape_nodes, att.head_shape_values = _head_shape_nodes(att.nodes, att)
        return att


# ------------------------------------------------------------------ helpers


def _scale_factor(node: ir.Node) -> tuple[float | None, bool]:
    """(constant scalar multiplier, has a non-constant scalar multiplier) of a Mul/Div
    on the q or k path."""
    if node.op_type not in ("Mul", "Div"):
        return None, False
    a, b = node.inputs[0], node.inputs[1]
    for i, v in enumerate((a, b)):
        c = const_scalar(v)
        if c is not None:
            if node.op_type == "Div":
                return (1.0 / c if i == 1 else None), False
            return c, False
    # non-constant multiplier: SDPA exports compute sqrt(1/sqrt(d)) from Shape(q)
    for v in (a, b):
        if v is not None and _from_shapes_only(v) and _has_ancestor(v, {"Sqrt"}, limit=12):
            return None, True
    return None, False


def _from_shapes_only(value: ir.Value, limit: int = 40) -> bool:
    """True when ``value`` depends on the graph inputs only through ``Shape`` ops
    (a number computed from tensor sizes, like SDPA's default scale)."""
    queue = deque([value])
    seen: set[int] = set()
    found_shape = False
    while queue:
        v = queue.popleft()
        if v is None:
            continue
        if v.is_graph_input():
            return False
        node = producer(v)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if len(seen) > limit:
            return False
        if node.op_type in ("Shape", "Size"):
            found_shape = True
            continue
        queue.extend(x for x in node.inputs if x is not None)
    return found_shape


def _has_ancestor(value: ir.Value, ops, limit: int = 40, avoid: set[int] | None = None) -> bool:
    queue = deque([value])
    seen: set[int] = set()
    while queue and len(seen) < limit:
        v = queue.popleft()
        node = producer(v)
        if node is None or id(node) in seen or (avoid and id(node) in avoid):
            continue
        seen.add(id(node))
        if node.op_type in ops:
            return True
        queue.extend(x for x in node.inputs if x is not None)
    return False


def _mask_is_causal(value: ir.Value) -> bool:
    """A mask is causal when it is built from a triangle (Trilu), from comparing
    position ranges (``kv_idx <= q_idx``), or from a constant lower-triangular buffer."""
    queue = deque([value])
    seen: set[int] = set()
    while queue and len(seen) < 400:
        v = queue.popleft()
        if v is None:
            continue
        node = producer(v)
        if node is None:
            arr = v.const_value.numpy() if v.const_value is not None and not v.is_graph_input() else None
            if arr is not None and _is_triangular(arr):
                return True
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "Trilu":
            return True
        if node.op_type in _CAUSAL_COMPARE and all(
            x is not None and not is_constant(x) and _has_ancestor(x, {"Range"}, limit=30)
            for x in node.inputs
        ):
            return True
        if node.op_type == "Constant":
            arr = const_array(node.outputs[0])
            if arr is not None and _is_triangular(arr):
                return True
            continue
        queue.extend(x for x in node.inputs if x is not None)
    return False


def _is_triangular(arr: np.ndarray) -> bool:
    if arr.ndim < 2 or arr.shape[-1] != arr.shape[-2] or arr.shape[-1] < 2 or arr.size > 1 << 24:
        return False
    m = arr.reshape(-1, arr.shape[-2], arr.shape[-1])[0]
    if m.dtype == bool or np.issubdtype(m.dtype, np.integer):
        m = m.astype(bool)
        return bool(np.all(np.tril(m) == m) and np.all(np.diag(m))) and not bool(np.all(m))
    return False


def _reshape_heads(nodes: list[ir.Node], d_out: int | None = None) -> tuple[int | None, int | None]:
    """(heads, last dim) from the head-split Reshape nearest the projection on a path:
    a Reshape to 4+ dims ([b, s, heads, head]), else to 3 dims ([b*heads, s, head])
    whose last dim is not the projection width."""
    fallback: tuple[int | None, int | None] = (None, None)
    for node in reversed(nodes):  # nodes are nearest-first from the scores; reverse = nearest the projection
        if node.op_type != "Reshape":
            continue
        dims = shape_elements(node.inputs[1])
        if dims is None or len(dims) < 3:
            continue
        last, heads = dims[-1], dims[-2]
        if last is None or last <= 0:
            continue
        if len(dims) >= 4:
            return (heads if heads is not None and heads > 0 else None), last
        if last != d_out and fallback == (None, None):
            fallback = (None, last)
    return fallback


def _static_dim(value: ir.Value | None, axis: int) -> int | None:
    if value is None or value.shape is None or len(value.shape) != 4:
        return None
    d = value.shape[axis]
    return d if isinstance(d, int) and d > 0 else None


def _static_last_dim(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None or len(value.shape) < 3:
        return None
    d = value.shape[-1]
    return d if isinstance(d, int) and d > 0 else None


def _split_size(nodes: list[ir.Node], lin: Linear) -> int | None:
    """Size of the part of a packed projection's output that a path takes, when the
    output is cut along its last axis (maybe after a Reshape that keeps the last
    axis, as GPT-2's Conv1D export does)."""
    on_path = {id(n) for n in nodes}
    value = lin.output
    for _ in range(6):
        nxt = [c for c in consumers(value) if id(c) in on_path]
        if len(nxt) != 1:
            return None
        node = nxt[0]
        if node.op_type in ("Cast", "Identity"):
            value = node.outputs[0]
            continue
        if node.op_type == "Reshape":
            dims = shape_elements(node.inputs[1])
            if not dims or dims[-1] != lin.d_out:
                return None
            value = node.outputs[0]
            continue
        if node.op_type == "Split":
            if _attr(node, "axis", 0) not in (-1, 1, 2):
                return None
            sizes = (
                const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
            )
            if sizes is None:
                sizes = _attr(node, "split", None)
            if sizes is None:
                return lin.d_out // len(node.outputs)
            return int(list(sizes)[_which_output(node, nodes)])
        if node.op_type == "Slice":
            starts, ends = const_array(node.inputs[1]), const_array(node.inputs[2])
            axes = (
                const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
            )
            if starts is None or ends is None or starts.size != 1:
                return None
            if axes is not None and int(axes.reshape(-1)[0]) not in (-1, 1, 2):
                return None
            s, e = int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])
            s = s + lin.d_out if s < 0 else s
            e = e + lin.d_out if e < 0 else min(e, lin.d_out)
            return e - s
        return None
    return None


def _which_output(node: ir.Node, path: list[ir.Node]) -> int:
    path_inputs = {id(v) for n in path for v in n.inputs if v is not None}
    for i, out in enumerate(node.outputs):
        if id(out) in path_inputs:
            return i
        # the path may start at the Split output directly (consumed by the scores MatMul)
    for i, out in enumerate(node.outputs):
        if any(c.op_type in ("MatMul", "Reshape", "Transpose") for c in consumers(out)):
            return i
    return 0


def _first_past(trace: _Trace) -> ir.Value | None:
    for v in trace.graph_inputs:
        if v.shape is not None and len(v.shape) == 4 or "past" in (v.name or "").lower():
            return v
    return trace.graph_inputs[0] if trace.graph_inputs else None


def _present(trace: _Trace) -> ir.Value | None:
    for node in trace.nodes:
        for out in node.outputs:
            if out.is_graph_output():
                return out
    return None


def _head_shape_nodes(core: list[ir.Node], att: Attention) -> tuple[list[ir.Node], list[ir.Value]]:
    """Reshape/Expand/Tile nodes (and the Concat/Constant nodes feeding their shape
    inputs) whose constants encode head counts: what head pruning must edit."""
    h, kv, d = att.num_heads, att.num_kv_heads, att.head_size
    special = {h, kv, h * d, kv * d}
    if kv and h % kv == 0 and h // kv > 1:
        special.add(h // kv)
    nodes: list[ir.Node] = []
    values: list[ir.Value] = []

    def add_node(n):
        if n not in nodes:
            nodes.append(n)

    for node in core:
        if node.op_type not in ("Reshape", "Expand", "Tile") or len(node.inputs) < 2:
            continue
        dims = shape_elements(node.inputs[1])
        if not dims or not any(x in special for x in dims if x is not None):
            continue
        add_node(node)
        queue = deque([node.inputs[1]])
        seen: set[int] = set()
        while queue:
            v = queue.popleft()
            if v is None or id(v) in seen:
                continue
            seen.add(id(v))
            arr = const_array(v)
            p = producer(v)
            if arr is not None and (p is None or p.op_type in ("Constant", "Identity")):
                if any(int(x) in special for x in np.asarray(arr).reshape(-1)[:16]):
                    values.append(v)
                    if p is not None:
                        add_node(p)
                continue
            if p is not None and p.op_type in (
                "Concat",
                "Unsqueeze",
                "Cast",
                "Identity",
                "Reshape",
                "Squeeze",
            ):
                if p.op_type == "Concat":
                    add_node(p)
                queue.extend(x for x in p.inputs if x is not None)
    return nodes, values
