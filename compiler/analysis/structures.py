"""The result types of the transformer analysis.

Field names are an API: every pass codes against them. Nodes and values are the
live ``onnx_ir`` objects of the analysed model (the analysis never copies or
mutates), so a pass can rewrite exactly what was found; re-run ``analyze`` after a
rewrite, the map describes the graph as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir


@dataclass
class Linear:
    """``x @ W (+ b)`` with a constant weight ``W``."""

    node: ir.Node  # MatMul / Gemm / MatMulNBits / fused com.microsoft.Attention (packed QKV)
    weight: ir.Value  # the constant weight value (initializer or Constant output); shape as stored
    bias: ir.Value | None  # constant bias if any
    bias_node: ir.Node | None  # the Add that applies it (None for Gemm's C input / fused biases)
    d_in: int
    d_out: int
    transposed: bool  # True when the stored weight is [d_out, d_in] (Gemm transB=1, MatMulNBits)
    input: ir.Value  # activation input
    output: ir.Value  # value after the bias (or the MatMul output when no bias)
    weight_via: list[ir.Node] = field(default_factory=list)  # Identity/Cast/Transpose/DequantizeLinear

    @property
    def name(self) -> str:
        return self.node.name or self.weight.name or "?"

    @property
    def params(self) -> int:
        from onnxpress.analysis.graph_utils import numel, tensor_shape

        n = self.d_in * self.d_out
        if self.bias is not None:
            shape = tensor_shape(self.bias)
            n += numel(shape) if shape is not None else self.d_out
        return n


@dataclass
class ScaleFactor:
    """One scalar multiplier of the attention scores."""

    node: ir.Node  # the Mul / Div applying it (the scores FusedMatMul for its alpha)
    value: float | None  # the constant factor; None: not a constant (SDPA's sqrt(1/sqrt(D)) from a Shape)
    on: str  # "scores" (between q @ k^T and the Softmax), "q" or "k" (on that operand's path)
    walked: bool  # between the operand value a fused op reads and the Softmax: that op must apply it


@dataclass
class MaskTerm:
    """One term between the scores and the Softmax: a tensor added to them, or the condition
    of a ``Where`` that fills them."""

    value: ir.Value
    node: ir.Node  # the Add / Sub / Where applying it
    condition: bool = False  # a Where condition: keep the scores where true, else ``fill``
    fill: float | None = 0.0  # the Where's fill; None when it is not a constant scalar
    padding_source: ir.Value | None = None  # the 2-D [B, S_total] integer graph input it is built from
    pure: bool = True  # built only from that input, shapes and small constants (padding/causal)


# Axis labels of operand values: B batch, H heads, S positions, D head dim; PACKED is [B, S, H*D].
PACKED = "BSX"


@dataclass
class OperandPath:
    """The tensor a fused attention op reads for Q, K or V: where the walk up from the scores
    or context MatMul operand stopped (the head-split Reshape of the projection output, a
    rotary or Split output), and what it crossed."""

    value: ir.Value
    axes: str  # labels of ``value``'s axes, e.g. "BHSD", "BSHD", or PACKED
    past: ir.Value | None = None  # KV-cache graph input concatenated in front
    present: ir.Value | None = None  # the Concat output holding past + new (BHSD)
    repeated: bool = False  # crossed a repeat-KV expansion
    # every value crossed: (value, its axis labels, heads on its H axis, includes the past positions)
    trail: list[tuple[ir.Value, str, int, bool]] = field(default_factory=list)


@dataclass
class Attention:
    layer: int
    # "decomposed" | "com.microsoft.Attention" | "com.microsoft.MultiHeadAttention" |
    # "com.microsoft.GroupQueryAttention" | "Attention" (ONNX opset 23) | "onnxpress.Attention"
    kind: str
    q: Linear | None
    k: Linear | None
    v: Linear | None
    qkv: Linear | None  # packed projection (GPT-2 c_attn, GPT-NeoX, Phi-3 qkv, fused Attention weights)
    o: Linear | None
    num_heads: int
    num_kv_heads: int
    head_size: int
    scale: float
    causal: bool
    mask: ir.Value | None  # the additive mask / mask input feeding the scores (None if no mask)
    rotary: bool
    softmax: ir.Node | None = None
    scores_matmul: ir.Node | None = None
    context_matmul: ir.Node | None = None
    fused_node: ir.Node | None = None
    # Reshape/Constant/Concat/Expand nodes whose constants encode head counts (pruning edits them)
    head_shape_nodes: list[ir.Node] = field(default_factory=list)
    # the constant values themselves (initializers or Constant outputs) holding those counts
    head_shape_values: list[ir.Value] = field(default_factory=list)
    past_key: ir.Value | None = None
    past_value: ir.Value | None = None
    present_key: ir.Value | None = None
    present_value: ir.Value | None = None
    nodes: list[ir.Node] = field(default_factory=list)  # the core between the projections and o
    # "constant" | "attribute" | "default" (1/sqrt(head_size) implied) | "none" (no factor)
    scale_source: str = "constant"
    # how the packed qkv output is laid out: "blocks" ([Q|K|V]) or "interleaved" ([h0:q,k,v | h1:...])
    qkv_layout: str | None = None
    # decomposed cores: every scalar multiplier of the scores between the projections and the Softmax
    scale_factors: list[ScaleFactor] = field(default_factory=list)
    # decomposed cores: the terms between the scores and the Softmax, nearest the Softmax first
    mask_terms: list[MaskTerm] = field(default_factory=list)
    # decomposed cores: the Q, K, V tensors a fused op replacing the core reads
    q_path: OperandPath | None = None
    k_path: OperandPath | None = None
    v_path: OperandPath | None = None
    # the scale that op applies to q_path @ k_path^T (the walked factors); None when scores_problem is set
    path_scale: float | None = None
    # why the scores are not path_scale * (q_path @ k_path^T) + mask_terms (None: they are)
    scores_problem: str | None = None

    @property
    def projections(self) -> list[Linear]:
        return [p for p in (self.q, self.k, self.v, self.qkv, self.o) if p is not None]

    @property
    def q_out(self) -> int:
        return self.num_heads * self.head_size

    @property
    def kv_out(self) -> int:
        return self.num_kv_heads * self.head_size


@dataclass
class FFN:
    layer: int
    up: Linear
    gate: Linear | None
    down: Linear
    activation: str  # "gelu", "gelu_new", "silu", "relu", "quick_gelu", ...
    packed_gate_up: bool = False  # one Linear producing [gate | up] halves (Phi-3 gate_up_proj)

    @property
    def ffn_size(self) -> int:
        return self.down.d_in

    @property
    def linears(self) -> list[Linear]:
        return [p for p in (self.gate, self.up, self.down) if p is not None]


@dataclass
class Layer:
    index: int
    attention: Attention | None
    ffn: FFN | None
    norms: list[ir.Node] = field(
        default_factory=list
    )  # fused norm nodes, or the output node of a decomposed one
    residual_adds: list[ir.Node] = field(default_factory=list)
    params: int = 0  # weights in this layer (projections, biases, norm weights)
    macs: int = 0  # MACs per token at seq_len (see cost.count_macs)

    @property
    def linears(self) -> list[Linear]:
        out = list(self.attention.projections) if self.attention else []
        if self.ffn:
            out += self.ffn.linears
        return out


@dataclass
class Extra:
    """A weight-bearing node outside the layers (LM head, pooler, embedding projection, ...)."""

    role: str  # "lm_head" | "pooler" | "classifier" | "embedding_projection" | "patch_embedding" | "linear"
    node: ir.Node
    linear: Linear | None = None

    def describe(self) -> str:
        shape = f" {self.linear.d_in}->{self.linear.d_out}" if self.linear else ""
        return f"outside the layers: {self.role} {self.node.op_type} {self.node.name or ''}{shape}".rstrip()


@dataclass
class TransformerMap:
    layers: list[Layer]
    kind: str  # "encoder" | "decoder" | "vision"
    causal: bool
    kv_cache_inputs: list[ir.Value] = field(default_factory=list)
    kv_cache_outputs: list[ir.Value] = field(default_factory=list)
    unrecognised: list[str] = field(default_factory=list)  # plain sentences: what was not recognised, where
    params: int = 0
    macs: int = 0
    extras: list[Extra] = field(default_factory=list)  # informational: LM head, pooler, ...
    seq_len: int = 128  # the sequence length ``macs`` was computed for

    @property
    def has_attention(self) -> bool:
        return any(layer.attention is not None for layer in self.layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def attentions(self) -> list[Attention]:
        return [layer.attention for layer in self.layers if layer.attention is not None]

    def ffns(self) -> list[FFN]:
        return [layer.ffn for layer in self.layers if layer.ffn is not None]

    def to_dict(self) -> dict:
        layers = []
        for layer in self.layers:
            att, ffn = layer.attention, layer.ffn
            layers.append(
                {
                    "index": layer.index,
                    "attention_kind": att.kind if att else None,
                    "num_heads": att.num_heads if att else None,
                    "num_kv_heads": att.num_kv_heads if att else None,
                    "head_size": att.head_size if att else None,
                    "ffn_size": ffn.ffn_size if ffn else None,
                    "activation": ffn.activation if ffn else None,
                    "params": layer.params,
                    "macs": layer.macs,
                    "rotary": att.rotary if att else None,
                    "causal": att.causal if att else None,
                    "has_mask": att.mask is not None if att else None,
                }
            )
        return {
            "kind": self.kind,
            "causal": self.causal,
            "params": self.params,
            "macs": self.macs,
            "layers": layers,
            "kv_cache_inputs": [v.name for v in self.kv_cache_inputs],
            "kv_cache_outputs": [v.name for v in self.kv_cache_outputs],
            "extras": [e.describe() for e in self.extras],
            "unrecognised": list(self.unrecognised),
        }

    def format_table(self) -> str:
        head = (
            f"{self.kind} with {len(self.layers)} layers, "
            f"{'causal' if self.causal else 'bidirectional'}, {_human(self.params)} params, "
            f"{_human(self.macs)} MACs/token at seq {self.seq_len}"
        )
        if self.kv_cache_inputs:
            head += f", KV cache ({len(self.kv_cache_inputs)} inputs / {len(self.kv_cache_outputs)} outputs)"
        cols = [
            "layer",
            "attention",
            "heads",
            "kv",
            "head",
            "rope",
            "mask",
            "ffn",
            "act",
            "gated",
            "norms",
            "params",
            "MACs",
        ]
        rows = []
        for layer in self.layers:
            att, ffn = layer.attention, layer.ffn
            rows.append(
                [
                    str(layer.index),
                    att.kind if att else "-",
                    str(att.num_heads) if att else "-",
                    str(att.num_kv_heads) if att else "-",
                    str(att.head_size) if att else "-",
                    ("yes" if att.rotary else "no") if att else "-",
                    _mask_label(att) if att else "-",
                    str(ffn.ffn_size) if ffn else "-",
                    ffn.activation if ffn else "-",
                    ("yes" if ffn.gate is not None or ffn.packed_gate_up else "no") if ffn else "-",
                    str(len(layer.norms)),
                    _human(layer.params),
                    _human(layer.macs),
                ]
            )
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
        lines = [head, "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
        for extra in self.extras:
            lines.append(f"note: {extra.describe()}")
        for msg in self.unrecognised:
            lines.append(f"not recognised: {msg}")
        return "\n".join(lines)


def _mask_label(att: Attention) -> str:
    parts = (["causal"] if att.causal else []) + (["mask"] if att.mask is not None else [])
    return "+".join(parts) or "none"


def _human(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)
