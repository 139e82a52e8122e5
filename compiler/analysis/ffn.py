"""Find feed-forward blocks by dataflow.

An FFN is recognised from its *down* projection: a constant-weight Linear whose
input is reached, through elementwise ops and an activation function only, from
one or two other (non-attention) Linears. With two, the one whose path crosses the
activation is the *gate* (gated FFN: ``down(act(gate(x)) * up(x))``); the other is
*up*. With one, it is *up* (``down(act(up(x)))``) or a packed gate-up projection
whose halves are multiplied (Phi-3). The LM head, pooler and embedding projections
never match: no activation lies between them and the projection before them.
"""

from __future__ import annotations

from collections import deque

import onnx_ir as ir

from onnxpress.analysis.graph_utils import (
    ACTIVATION_OPS,
    const_scalar,
    consumers,
    is_constant,
    producer,
    walk_to_linears,
)
from onnxpress.analysis.structures import FFN, Linear

# Ops crossed walking up from a down projection's input to the up/gate projections.
_FFN_OPS = ACTIVATION_OPS | {
    "Mul",
    "Div",
    "Add",
    "Sub",
    "Pow",
    "Cast",
    "Identity",
    "Reshape",
    "Split",
    "Slice",
    "Neg",
    "Max",
    "Min",
    "Clip",
    "Dropout",
    "Squeeze",
    "Unsqueeze",
    "Exp",
    "Log",
    "Abs",
    "Sqrt",
}


# ops whose other inputs are shapes / indices, not data
_DATA_INPUT_ONLY = frozenset({"Reshape", "Split", "Slice", "Squeeze", "Unsqueeze", "Clip", "Dropout", "Cast"})


def _follow(node: ir.Node) -> list[ir.Value] | None:
    if node.op_type not in _FFN_OPS:
        return None  # a foreign op: not a clean FFN path
    if node.op_type in _DATA_INPUT_ONLY:
        return [node.inputs[0]]
    return [v for v in node.inputs if v is not None and not is_constant(v)]


def find_ffns(index, attention_linears: set[int]) -> tuple[list[FFN], list[str]]:
    """All FFN blocks (``layer`` left at -1), and notes on near misses."""
    ffns: list[FFN] = []
    notes: list[str] = []
    used: set[int] = set()
    for down in index.ordered:
        if id(down.node) in attention_linears or id(down.node) in used:
            continue
        walk = walk_to_linears(down.input, index.for_value, _follow, limit=80)
        if not walk.linears or walk.foreign:
            continue
        if any(id(lin.node) in attention_linears for lin in walk.linears):
            continue
        acts = [n for n in walk.nodes if n.op_type in ACTIVATION_OPS]
        if not acts:
            continue
        if len(walk.linears) > 2:
            notes.append(
                f"MatMul {down.node.name or '?'}: {len(walk.linears)} projections feed it through an activation; "
                "not a recognised FFN"
            )
            continue
        activation = _classify_activation(acts, walk.nodes)
        if len(walk.linears) == 2:
            a, b = walk.linears
            a_act = _activation_between(a, walk.nodes)
            b_act = _activation_between(b, walk.nodes)
            if a_act and not b_act:
                gate, up = a, b
            elif b_act and not a_act:
                gate, up = b, a
            else:
                notes.append(
                    f"MatMul {down.node.name or '?'}: two-branch FFN without a single activated branch"
                )
                gate, up = a, b
            ffn = FFN(layer=-1, up=up, gate=gate, down=down, activation=activation)
        else:
            up = walk.linears[0]
            packed = _is_packed_gate_up(up, walk.nodes)
            ffn = FFN(layer=-1, up=up, gate=None, down=down, activation=activation, packed_gate_up=packed)
        for lin in ffn.linears:
            used.add(id(lin.node))
        ffns.append(ffn)
    return ffns, notes


def _activation_between(lin: Linear, nodes: list[ir.Node]) -> bool:
    """Whether an activation op lies on the path from ``lin`` into the FFN walk."""
    inside = {id(n) for n in nodes}
    queue = deque([lin.output])
    seen: set[int] = set()
    while queue:
        value = queue.popleft()
        for node in consumers(value):
            if id(node) not in inside or id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in ACTIVATION_OPS:
                return True
            if node.op_type == "Mul" and all(v is not None and not is_constant(v) for v in node.inputs):
                # the gating product: stop here, the other branch joins at this Mul -
                # unless this is x * sigmoid(x) (SiLU), where both operands come from lin
                if not _is_self_gated(node):
                    continue
            queue.extend(node.outputs)
    return False


def _is_self_gated(mul: ir.Node) -> bool:
    a, b = mul.inputs[0], mul.inputs[1]
    for x, y in ((a, b), (b, a)):
        p = producer(y)
        if p is not None and p.op_type in ACTIVATION_OPS and p.inputs and p.inputs[0] is x:
            return True
    return False


def _is_packed_gate_up(lin: Linear, nodes: list[ir.Node]) -> bool:
    cut = [n for n in nodes if n.op_type in ("Split", "Slice") and n.inputs and n.inputs[0] is lin.output]
    return len(cut) >= 2 or any(n.op_type == "Split" and len(n.outputs) == 2 for n in cut)


def _classify_activation(acts: list[ir.Node], nodes: list[ir.Node]) -> str:
    ops = {n.op_type for n in acts}
    if "Gelu" in ops:
        gelu = next(n for n in acts if n.op_type == "Gelu")
        return "gelu_new" if gelu.attributes.get_string("approximate", "none") == "tanh" else "gelu"
    if ops & {"FastGelu", "BiasFastGelu"}:
        return "gelu_new"
    if ops & {"BiasGelu"}:
        return "gelu"
    if "QuickGelu" in ops:
        return "quick_gelu"
    if "Erf" in ops:
        return "gelu"
    if "Tanh" in ops:
        if "Softplus" in ops:
            return "mish"
        has_cube = any(n.op_type == "Pow" and const_scalar(n.inputs[1]) == 3.0 for n in nodes)
        has_coeff = any(
            n.op_type == "Mul" and any(abs((const_scalar(v) or 0) - 0.044715) < 1e-4 for v in n.inputs)
            for n in nodes
        )
        return "gelu_new" if has_cube or has_coeff else "tanh"
    if "Sigmoid" in ops:
        sig = next(n for n in acts if n.op_type == "Sigmoid")
        p = producer(sig.inputs[0])
        if (
            p is not None
            and p.op_type == "Mul"
            and any(abs((const_scalar(v) or 0) - 1.702) < 1e-3 for v in p.inputs)
        ):
            return "quick_gelu"
        if any(n.op_type == "Mul" and _is_self_gated(n) for n in nodes):
            return "silu"
        return "sigmoid"
    if "Swish" in ops:
        return "silu"
    if "Relu" in ops:
        return (
            "relu2" if any(n.op_type == "Pow" and const_scalar(n.inputs[1]) == 2.0 for n in nodes) else "relu"
        )
    return sorted(ops)[0].lower()
