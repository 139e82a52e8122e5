"""Rotary embeddings: onnxscript's rules fuse the decomposed rotation into ORT's
``com.microsoft.RotaryEmbedding`` with cos/sin tables computed once; ours then folds the
query's and key's rotation into the ``GroupQueryAttention`` that reads them (``do_rotary``).

The tables: onnxscript's ``CosSinCacheFusion`` replaces the graph's per-call cos/sin
computation (``inv_freq @ position_ids``) by initializers for positions ``0 ..
max_positions - 1`` (the model's context length), computed in float32 from the graph's own
``inv_freq`` as the graph computes them (ORT refuses a position past the table's end).

Folding into the attention changes where positions come from: ``RotaryEmbedding`` reads
``position_ids``, ``GroupQueryAttention`` derives them from the cache, token ``j`` of a call
after ``past`` cached tokens at ``past + j`` (its ``seqlens_k`` is the total length less one for
every row, padding goes in the bias). The two agree where ``position_ids`` counts from the
first cached token: unpadded and right-padded batches (the tokens before the padding), which
is how ``onnxpress.generation``, the calibration data and GenAI feed them; a left-padded row's
positions are shifted by its padding, which rotary attention scores do not see (only the
cache stores keys rotated by other angles). The rule only folds rotations whose positions are
the graph's ``position_ids`` input, and says why it did not fold a layer otherwise.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions.cos_sin_cache import CosSinCacheFusion

from onnxpress.analysis.graph_utils import constant_tensor
from onnxpress.calibration import is_past_input
from onnxpress.passes.fuse.canonical import named_dim, same_dim

# ORT's CPU kernel rotates inside GroupQueryAttention only for head sizes that are multiples of 16
GQA_ROTARY_HEAD_MULTIPLE = 16
GQA_ROTARY_TABLE_MULTIPLE = 8  # ... and cos/sin tables whose width (half the rotated dims) is a multiple of 8
POSITIONS_INPUT = "position_ids"


class _CosSinTables(CosSinCacheFusion):
    """onnxscript's rule with the table length set (it would otherwise compute the tables
    at every call, up to the largest position given)."""

    def __init__(self, name: str, max_positions: int, failures: list[str], **variant):
        super().__init__(name, **variant)
        self.max_pos_id = max_positions - 1
        self.failures = failures

    def check(self, context, x, position_ids, **bindings) -> pattern.MatchResult:
        result = super().check(context, x=x, position_ids=position_ids, **bindings)
        # ORT's RotaryEmbedding takes one row of positions per batch row; the rule would pass
        # positions counted in the graph as one [1, sequence] row. A [batch, sequence] input
        # declares its batch dim by name (the graph's inputs share it)
        shape = position_ids.shape if position_ids is not None else None
        if result and not (shape is not None and len(shape) == 2 and (
                same_dim(position_ids, 0, x, 0) or (position_ids.is_graph_input() and named_dim(shape[0])))):
            result = pattern.MatchResult().fail("the positions are not [batch, sequence] (ORT's RotaryEmbedding "
                                                "takes no shared row)", position_ids)
        if not result and result.reason:
            self.failures.append(result.reason)
        return result


def cos_sin_rules(max_positions: int, failures: list[str]) -> pattern.RewriteRuleSet:
    """onnxscript's four cos/sin table rules (with and without a Cast of the tables, with
    computed or folded frequencies), tables for ``max_positions`` positions; ``failures``
    collects why a rotation kept its computed tables."""
    variants = {"CosSinCache_cast": {"cast": True}, "CosSinCache_cast_const_freqs": {"cast": True, "const_freqs": True},
                "CosSinCache_const_freqs": {"const_freqs": True}, "CosSinCache": {}}
    return pattern.RewriteRuleSet([_CosSinTables.rule(name, max_positions, failures, **kw)
                                   for name, kw in variants.items()])


def _rotated(op, heads, name: str):
    """``heads`` [B, S, H, D] -> [B, H, S, D] -> RotaryEmbedding -> back to [B, S, H*D]."""
    heads = op.Transpose(heads, perm=[0, 2, 1, 3])
    rotated = op.RotaryEmbedding(heads, pattern.ANY_VALUE, pattern.ANY_VALUE, pattern.ANY_VALUE,
                                 _domain="com.microsoft", _allow_other_attributes=True, _outputs=[f"{name}_rotary"])
    merged = op.Transpose(rotated, perm=[0, 2, 1, 3])
    return op.Reshape(merged, pattern.ANY_VALUE, _outputs=[f"{name}_packed"])


def _packed_source(heads: ir.Value) -> ir.Value | None:
    """The [B, S, H*D] tensor ``heads`` [B, S, H, D] was reshaped from, if it was."""
    node = heads.producer()
    if node is None or node.op_type != "Reshape" or node.domain not in ("", "ai.onnx"):
        return None
    source = node.inputs[0]
    if source.shape is None or len(source.shape) != 3 or source.shape[-1] != heads.shape[2] * heads.shape[3]:
        return None
    return source


class RotaryIntoAttention(pattern.RewriteRuleClassBase):
    """GroupQueryAttention(rotary(q), rotary(k), v, ...) -> GroupQueryAttention(q, k, v, ...,
    cos, sin, do_rotary=1). ``outputs``: 3 with a KV cache (present key / value), 1 without."""

    def __init__(self, outputs: int, failures: list[str]):
        super().__init__(f"RotaryIntoAttention{outputs}")
        self.outputs = outputs
        self.failures = failures  # why a candidate was not folded, for the pass's details

    def pattern(self, op, q_heads, k_heads, v):
        return op.GroupQueryAttention(_rotated(op, q_heads, "q"), _rotated(op, k_heads, "k"), v, _domain="com.microsoft",
                                      _allow_other_inputs=True, _allow_other_attributes=True,
                                      _outputs=[f"out{i}" for i in range(self.outputs)])

    def check(self, context, q_rotary, k_rotary, q_heads, k_heads, q_packed, k_packed, out0,
              **_) -> pattern.MatchResult:
        result = self._check(q_rotary, k_rotary, q_heads, k_heads, q_packed, k_packed, out0.producer())
        if result.reason:
            self.failures.append(result.reason)
        return result

    def _check(self, q_rotary, k_rotary, q_heads, k_heads, q_packed, k_packed, gqa) -> pattern.MatchResult:
        result = pattern.MatchResult()
        rq, rk = q_rotary.producer(), k_rotary.producer()
        if gqa.attributes.get_int("do_rotary", 0):
            return result.fail("the attention already rotates", gqa)
        if len(gqa.inputs) > 7 and any(v is not None for v in gqa.inputs[7:10]):
            return result.fail("the attention already takes cos/sin tables or positions", gqa)
        # q and k rotated alike: the same positions and tables, the whole head, no scale
        if any(a is not b for a, b in zip(rq.inputs[1:], rk.inputs[1:], strict=True)):
            return result.fail("query and key are rotated with different positions or tables", rq)
        if any(constant_tensor(v) is None for v in rq.inputs[2:4]):
            return result.fail("the cos/sin tables are computed in the graph", rq)
        for attrs in (rq.attributes, rk.attributes):
            if attrs.get_float("scale", 1.0) != 1.0:
                return result.fail("the rotation is scaled", rq)
        self._interleaved = rq.attributes.get_int("interleaved", 0)
        if rk.attributes.get_int("interleaved", 0) != self._interleaved:
            return result.fail("query and key rotate different halves (interleaved)", rq)
        half = rq.inputs[2].shape[-1] if rq.inputs[2].shape is not None else None
        for attrs in (rq.attributes, rk.attributes):
            dim = attrs.get_int("rotary_embedding_dim", 0)
            if dim and dim != 2 * (half or 0):
                return result.fail("the rotated width is not the cos/sin tables' width", rq)
        positions = rq.inputs[1]
        if not (positions.is_graph_input() and positions.name == POSITIONS_INPUT):
            return result.fail(f"the positions are not the graph's {POSITIONS_INPUT} input (GroupQueryAttention "
                               "takes them from the cache length)", positions)
        if not half or half % GQA_ROTARY_TABLE_MULTIPLE:
            return result.fail(f"cos/sin tables {half} wide: ORT's GroupQueryAttention takes multiples of "
                               f"{GQA_ROTARY_TABLE_MULTIPLE}", rq)
        # [B, S, H, D] -> [B, H, S, D] -> rotated -> [B, S, H, D] -> [B, S, H*D]: the attention can
        # take the unrotated heads packed the same way
        for heads, merged in ((q_heads, q_packed), (k_heads, k_packed)):
            width = merged.shape[-1] if merged.shape is not None else None
            if (heads.shape is None or len(heads.shape) != 4 or not all(isinstance(d, int) for d in heads.shape[2:])
                    or width != heads.shape[2] * heads.shape[3]):
                return result.fail("the rotated heads are not [batch, sequence, heads, head_size] packed back to "
                                   "heads * head_size", heads)
            head_size = heads.shape[3]
            if head_size % GQA_ROTARY_HEAD_MULTIPLE or half > head_size // 2:
                return result.fail(f"head size {head_size}: ORT's GroupQueryAttention rotates head sizes that are "
                                   f"multiples of {GQA_ROTARY_HEAD_MULTIPLE} by at most the whole head", heads)
        if rq.inputs[2].dtype != q_heads.dtype:
            return result.fail("the cos/sin tables are not of the attention's type", rq)
        return result

    def rewrite(self, op, v, q_heads, k_heads, q_packed, k_packed, q_rotary, out0, **_):
        gqa = out0.producer()
        rotary = q_rotary.producer()
        q, k = (_packed_source(h) or op.Reshape(h, p.producer().inputs[1]) for h, p in ((q_heads, q_packed),
                                                                                        (k_heads, k_packed)))
        inputs = [*gqa.inputs, *[None] * (9 - len(gqa.inputs))]
        inputs[0], inputs[1], inputs[7], inputs[8] = q, k, rotary.inputs[2], rotary.inputs[3]
        attributes = {name: attr.value for name, attr in gqa.attributes.items()}
        attributes.update(do_rotary=1, rotary_interleaved=self._interleaved)
        return op.GroupQueryAttention(*inputs, _domain="com.microsoft", _outputs=self.outputs, **attributes)


def into_attention_rules(failures: list[str]) -> pattern.RewriteRuleSet:
    """The rule for attention with and without a KV cache; ``failures`` collects why a
    candidate was left as it is."""
    return pattern.RewriteRuleSet([RotaryIntoAttention.rule(n, failures) for n in (3, 1)])


def uncounted_positions(batches) -> str | None:
    """Why the ``position_ids`` of ``batches`` (feeds) are not the positions GroupQueryAttention
    counts (cache length + index, every row and token, padding included: the checks compare the
    padding's outputs too), or None when they are."""
    for feeds in batches:
        positions = feeds.get(POSITIONS_INPUT)
        if positions is None:
            continue
        past = next((v.shape[2] for k, v in feeds.items() if is_past_input(k) and v.ndim == 4), 0)
        if not (positions == past + np.arange(positions.shape[-1])).all():
            return (f"the data the model is checked on has {POSITIONS_INPUT} that do not count on from the cache "
                    "(left padding, or positions not counted through the padding)")
    return None
