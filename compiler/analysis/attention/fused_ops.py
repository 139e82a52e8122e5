"""The fused attention ops onnxpress reads and writes, as one table.

Each :class:`FusedAttentionSpec` says where an op takes each input and what it calls its
head-count, causal and scale attributes. The analysis reads fused nodes through it, and
the attention pass builds its nodes through it, so an input position is written down once.
Inputs and outputs are named by *role*, the same role name for every op (``query``,
``key_padding_mask``, ``attention_bias``, ``past_key``...), whatever the op's own schema
calls the input; the ``onnxpress.Attention`` positions come from
:mod:`onnxpress.runtime_ops.schema`, which owns that op.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import onnx_ir as ir

from onnxpress.runtime_ops.schema import (
    ATTENTION_INPUTS,
    ATTENTION_OP,
    ATTENTION_OUTPUTS,
    DOMAIN,
    DOMAIN_VERSION,
)

# Roles the analysis reads as the attention mask, first given wins.
MASK_ROLES = ("key_padding_mask", "attention_bias")


@dataclass(frozen=True)
class FusedAttentionSpec:
    """One fused attention op: its slots by role and its attribute names."""

    kind: str  # ``Attention.kind`` of a node of this op
    domain: str
    op_type: str
    since_version: int  # the opset version of ``domain`` the op needs
    inputs: Mapping[str, int]  # role -> input position
    outputs: Mapping[str, int]  # role -> output position
    num_heads: str  # int attribute: query heads
    kv_num_heads: str | None = None  # int attribute: key/value heads (None: as many as query heads)
    causal: str | None = None  # int attribute: 1 = causal (None: the op has no such attribute)
    always_causal: bool = False  # causal by definition (GroupQueryAttention)
    scale: str = "scale"  # float attribute; absent or 0: 1/sqrt(head_size)
    rotary: str | None = None  # int attribute: the op applies rotary embeddings itself
    window: str | None = None  # int attribute: sliding-window width
    qkv_sizes: str | None = None  # ints attribute: widths of the packed Q, K, V projection

    def input(self, node: ir.Node, role: str) -> ir.Value | None:
        """The value ``node`` takes as ``role`` (None when not given or the op has no such input)."""
        i = self.inputs.get(role)
        return node.inputs[i] if i is not None and i < len(node.inputs) else None

    def output(self, node: ir.Node, role: str) -> ir.Value | None:
        i = self.outputs.get(role)
        return node.outputs[i] if i is not None and i < len(node.outputs) else None

    def mask(self, node: ir.Node) -> ir.Value | None:
        """The key-padding mask or attention bias ``node`` takes (``MASK_ROLES`` order)."""
        for role in MASK_ROLES:
            value = self.input(node, role)
            if value is not None:
                return value
        return None

    def input_list(self, **values: ir.Value | None) -> list[ir.Value | None]:
        """Node inputs with each role's value at its position; trailing empty slots are left
        off, as ONNX writes omitted optional inputs."""
        unknown = set(values) - set(self.inputs)
        if unknown:
            raise KeyError(f"{self.kind} has no input {sorted(unknown)}")
        slots: list[ir.Value | None] = [None] * (max(self.inputs.values()) + 1)
        for role, value in values.items():
            slots[self.inputs[role]] = value
        while slots and slots[-1] is None:
            slots.pop()
        return slots

    def attributes(self, *, num_heads: int, kv_num_heads: int | None = None, scale: float | None = None,
                   causal: bool | None = None, window: int = 0) -> dict:
        """Node attributes under this op's names; values the op has no attribute for are left
        out (``causal`` None: not written)."""
        attrs: dict = {self.num_heads: int(num_heads)}
        if self.kv_num_heads is not None and kv_num_heads is not None:
            attrs[self.kv_num_heads] = int(kv_num_heads)
        if scale is not None:
            attrs[self.scale] = float(scale)
        if causal is not None and self.causal is not None:
            attrs[self.causal] = int(causal)
        if window and self.window is not None:
            attrs[self.window] = int(window)
        return attrs

    def read_heads(self, node: ir.Node) -> tuple[int, int]:
        """(query heads, KV heads) from the attributes; 0 where not written."""
        attrs = node.attributes
        kv = attrs.get_int(self.kv_num_heads, 0) if self.kv_num_heads else 0
        return attrs.get_int(self.num_heads, 0), kv

    def read_scale(self, node: ir.Node) -> float:
        """The scale attribute; 0.0 when absent (the op's default, 1/sqrt(head_size))."""
        return node.attributes.get_float(self.scale, 0.0)

    def read_causal(self, node: ir.Node) -> bool:
        return self.always_causal or bool(self.causal and node.attributes.get_int(self.causal, 0))


_MS = "com.microsoft"
_PRESENT = {"output": 0, "present_key": 1, "present_value": 2}

MS_ATTENTION = FusedAttentionSpec(
    "com.microsoft.Attention", _MS, "Attention", 1,
    # "input" is the hidden state: the op projects it with the packed "weights" and "bias";
    # its mask_index (3) is read as the key-padding mask; the cache is packed too
    # ([2, B, H, S, D] key and value): read as past_key / present_key
    inputs={"input": 0, "weights": 1, "bias": 2, "key_padding_mask": 3, "past_key": 4, "attention_bias": 5,
            "past_sequence_length": 6},
    outputs={"output": 0, "present_key": 1},
    num_heads="num_heads", causal="unidirectional", rotary="do_rotary", qkv_sizes="qkv_hidden_sizes",
)
MULTI_HEAD_ATTENTION = FusedAttentionSpec(
    "com.microsoft.MultiHeadAttention", _MS, "MultiHeadAttention", 1,
    inputs={"query": 0, "key": 1, "value": 2, "bias": 3, "key_padding_mask": 4, "attention_bias": 5,
            "past_key": 6, "past_value": 7, "past_sequence_length": 8, "cache_indirection": 9},
    outputs=_PRESENT, num_heads="num_heads", causal="unidirectional",
)
# MultiHeadAttention over packed (unpadded) tokens: read as MultiHeadAttention
PACKED_MULTI_HEAD_ATTENTION = FusedAttentionSpec(
    "com.microsoft.MultiHeadAttention", _MS, "PackedMultiHeadAttention", 1,
    inputs={"query": 0, "key": 1, "value": 2, "bias": 3, "token_offset": 4, "cumulative_sequence_length": 5,
            "attention_bias": 6},
    outputs={"output": 0}, num_heads="num_heads",
)
GROUP_QUERY_ATTENTION = FusedAttentionSpec(
    "com.microsoft.GroupQueryAttention", _MS, "GroupQueryAttention", 1,
    inputs={"query": 0, "key": 1, "value": 2, "past_key": 3, "past_value": 4, "seqlens_k": 5,
            "total_sequence_length": 6, "cos_cache": 7, "sin_cache": 8, "position_ids": 9,
            "attention_bias": 10, "head_sink": 11},
    outputs=_PRESENT, num_heads="num_heads", kv_num_heads="kv_num_heads", always_causal=True,
    rotary="do_rotary",
)
ONNX_ATTENTION = FusedAttentionSpec(
    "Attention", "", "Attention", 23,
    # attn_mask (3) is boolean (keep where true) or added to the scores
    inputs={"query": 0, "key": 1, "value": 2, "attention_bias": 3, "past_key": 4, "past_value": 5,
            "nonpad_kv_seqlen": 6},
    outputs={**_PRESENT, "qk_matmul_output": 3},
    num_heads="q_num_heads", kv_num_heads="kv_num_heads", causal="is_causal",
)
# the role of each onnxpress.Attention slot its schema names otherwise
_ONNXPRESS_ROLES = {"attention_mask": "key_padding_mask"}
ONNXPRESS_ATTENTION = FusedAttentionSpec(
    f"{DOMAIN}.{ATTENTION_OP}", DOMAIN, ATTENTION_OP, DOMAIN_VERSION,
    inputs={_ONNXPRESS_ROLES.get(name, name): i for i, name in enumerate(ATTENTION_INPUTS)},
    outputs={_ONNXPRESS_ROLES.get(name, name): i for i, name in enumerate(ATTENTION_OUTPUTS)},
    num_heads="num_heads", kv_num_heads="kv_num_heads", causal="causal", window="window",
)

SPECS = (MS_ATTENTION, MULTI_HEAD_ATTENTION, PACKED_MULTI_HEAD_ATTENTION, GROUP_QUERY_ATTENTION,
         ONNX_ATTENTION, ONNXPRESS_ATTENTION)
_BY_OP = {(s.domain, s.op_type): s for s in SPECS}


def spec_for(node: ir.Node) -> FusedAttentionSpec | None:
    """The spec of a fused attention node, None for any other node."""
    domain = "" if node.domain == "ai.onnx" else node.domain
    return _BY_OP.get((domain, node.op_type))
