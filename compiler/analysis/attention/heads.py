"""Head geometry of an attention block: head count, KV head count, head size, packed layout.

Read from the evidence a decomposed core leaves: the scale (``1/sqrt(head_size)``), the
head-split Reshape constants, static shapes and the Split / Slice that cuts a packed QKV
projection. Also the constants that encode head counts, which head pruning must edit.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxpress.analysis.graph_utils import const_array, consumers, producer, shape_elements
from onnxpress.analysis.structures import Attention, Linear


@dataclass
class HeadGeometry:
    num_heads: int
    num_kv_heads: int
    head_size: int
    layout: str | None  # packed QKV output: "blocks" ([Q|K|V]) or "interleaved" (per head q, k, v)


def head_geometry(q: Linear, k: Linear, q_nodes: list[ir.Node], k_nodes: list[ir.Node], query: ir.Value,
                  scale: float, scale_source: str, notes: list[str], where: str) -> HeadGeometry | None:
    """The geometry of a decomposed core whose scores read ``query`` (the q operand); ``q_nodes``
    / ``k_nodes``: the paths from the projections (the same packed one when ``q is k``);
    ``scale``: the product of the constant scale factors. None (with a note) when the
    evidence is missing or inconsistent."""
    packed = q is k
    d_scale = None
    if scale_source == "constant" and scale > 0:
        d = 1.0 / (scale * scale)
        if abs(d - round(d)) < 1e-3 * d and round(d) >= 1:
            d_scale = int(round(d))
    heads_r, d_r = reshape_heads(q_nodes, q.d_out)
    d_static = static_last_dim(query)
    heads_static = _static_dim(query, 1)
    if packed:
        total = q.d_out
        q_size, k_size = _split_size(q_nodes, q), _split_size(k_nodes, k)
    else:
        total = None
        q_size, k_size = q.d_out, k.d_out
    ref = q_size or total
    # The shapes the graph reshapes to decide the head size, not the scale: some models scale
    # scores by a configured multiplier (Granite) rather than 1/sqrt(head size). The scale
    # decides one case: a packed per-head [q|k|v] reshape ([b, s, heads, 3 * head]).
    interleaved = packed and d_scale and d_r == 3 * d_scale and d_static in (None, d_scale)
    candidates = [d_scale] if interleaved else [d_static, d_r, d_scale]
    head_size = next((c for c in candidates if c and c > 0 and (ref is None or ref % c == 0)), None)
    if head_size is None:
        notes.append(f"{where}: cannot determine the head size (scale {scale:g}, reshape {d_r})")
        return None
    if d_static and d_r and d_static != d_r and not packed:
        notes.append(f"{where}: the head-split Reshape says head size {d_r}, the static shapes {d_static}")
        return None
    layout = None
    if not packed:
        num_heads, num_kv = q_size // head_size, k_size // head_size
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
            notes.append(f"{where}: packed QKV split not readable; assuming equal Q/K/V thirds")
        else:
            notes.append(f"{where}: packed QKV projection without a readable head split")
            return None
    if heads_r and heads_r > 0 and heads_r != num_heads and not packed:
        notes.append(f"{where}: head-split Reshape says {heads_r} heads, projection size says {num_heads}")
    if num_heads <= 0 or num_kv <= 0:
        notes.append(f"{where}: inconsistent head counts ({num_heads} heads, {num_kv} KV heads)")
        return None
    return HeadGeometry(num_heads, num_kv, head_size, layout)


def reshape_heads(nodes: list[ir.Node], d_out: int | None = None) -> tuple[int | None, int | None]:
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


def static_last_dim(value: ir.Value | None) -> int | None:
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
            return _split_part(node, nodes, lin.d_out)
        if node.op_type == "Slice":
            return _slice_part(node, lin.d_out)
        return None
    return None


def _split_part(node: ir.Node, path: list[ir.Node], width: int) -> int | None:
    if node.attributes.get_int("axis", 0) not in (-1, 1, 2):
        return None
    sizes = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if sizes is None:
        sizes = node.attributes.get_ints("split")
    if sizes is None:
        return width // len(node.outputs)
    return int(list(sizes)[_which_output(node, path)])


def _slice_part(node: ir.Node, width: int) -> int | None:
    starts, ends = const_array(node.inputs[1]), const_array(node.inputs[2])
    axes = const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    if starts is None or ends is None or starts.size != 1:
        return None
    if axes is not None and int(axes.reshape(-1)[0]) not in (-1, 1, 2):
        return None
    s, e = int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])
    s = s + width if s < 0 else s
    e = e + width if e < 0 else min(e, width)
    return e - s


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


_SHAPE_PARTS = frozenset({"Concat", "Unsqueeze", "Cast", "Identity", "Reshape", "Squeeze"})


def head_shape_nodes(core: list[ir.Node], att: Attention) -> tuple[list[ir.Node], list[ir.Value]]:
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
            if p is not None and p.op_type in _SHAPE_PARTS:
                if p.op_type == "Concat":
                    add_node(p)
                queue.extend(x for x in p.inputs if x is not None)
    return nodes, values
