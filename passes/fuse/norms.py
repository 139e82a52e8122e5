"""Residual Add + RMSNorm -> ``com.microsoft.SkipSimplifiedLayerNormalization``.

onnxscript fuses the two in two steps: RMSNorm -> ``SimplifiedLayerNormalization``, then
Add + that -> the Skip op. ``SimplifiedLayerNormalization`` sits in the ONNX domain, where the
ONNX checker has no such op, so a norm the second step leaves (the first layer's, Qwen3's
per-head norms) would fail every later stage's check. One rule does both steps instead: it is
onnxscript's ``RmsNormFusion`` (its pattern and checks) applied to the sum of a residual
``Add``. Norms without a residual Add stay as they are; ORT fuses those itself when it loads
the model, in the spelling its fusion matches, ``x / Sqrt(...)``. ``canonical`` spells
``Div(1, Sqrt)`` as ``Reciprocal`` for onnxscript's rule, so ``DivByReciprocal`` turns a norm's
``Mul`` by that reciprocal back into one ``Div`` (SmolLM2: the first layer's norm, 7 nodes at
every call, is then one ``SimplifiedLayerNormalization`` in the session).

onnxscript's rule also refuses statistics computed in float16 (it wants the float32 a
mixed-precision export casts to); ORT's kernel computes them in float32 whatever the input
type, so those fuse too, rounding less than the graph did (within float16's rounding, as the
checks allow for a float16 model).
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern
from onnxscript.rewriter.ort_fusions.rms_normalization import RmsNormFusion

from onnxpress.passes.fuse.canonical import named_dim, same_dim


def _unknown(dim) -> bool:
    return isinstance(dim, ir.SymbolicDim) and not named_dim(dim)


class SkipRmsNorm(RmsNormFusion):
    def pattern(self, op, input, skip, scale, epsilon, compute_dtype, target_dtype):
        total = op.Add(input, skip, _outputs=["total"])
        return super().pattern(op, total, scale, epsilon, compute_dtype, target_dtype), total

    def check(self, context, input, skip, total, scale, epsilon, compute_dtype, target_dtype,
              **_) -> pattern.MatchResult:
        self._stash_dtype = None
        result = super().check(context, total, scale, epsilon, compute_dtype, target_dtype)
        # the base check sets the statistics' type right before refusing half precision: a
        # failure with it set to float16 is that refusal and nothing else
        if not result and self._stash_dtype == ir.DataType.FLOAT16:
            self._stash_dtype, result = ir.DataType.FLOAT, pattern.MatchResult()
        if not result:
            return result
        # ORT's kernel broadcasts the skip only in ways an Add does not: both [batch, sequence,
        # hidden]; as in onnxscript's own skip rule, dims shape inference could not tell are taken
        # as equal (a residual Add sums two streams of the same shape), the hidden one must be known
        shapes = (input.shape, skip.shape)
        if any(s is None or len(s) != 3 for s in shapes) or not isinstance(input.shape[2], int) or not all(
                same_dim(input, i, skip, i) or _unknown(input.shape[i]) and _unknown(skip.shape[i]) for i in range(3)):
            return result.fail("the residual Add's operands are not both [batch, sequence, hidden]", input)
        if not same_dim(input, 2, scale, len(scale.shape) - 1 if scale.shape else 0):
            return result.fail("the norm's scale is not one per hidden channel", scale)
        return result

    def rewrite(self, op, input, skip, scale, epsilon, **_):
        normed, _mean, _inv_std, total = op.SkipSimplifiedLayerNormalization(
            input, skip, scale, epsilon=_ir_utils.get_singleton_value(epsilon), _outputs=4,
            _domain="com.microsoft")
        return normed, total


SKIP_NORM_RULES = pattern.RewriteRuleSet([SkipRmsNorm.rule("SkipRmsNorm1", _mul_order=False),
                                          SkipRmsNorm.rule("SkipRmsNorm2", _mul_order=True)])


class DivByReciprocal(pattern.RewriteRuleClassBase):
    """``Mul(x, Reciprocal(Sqrt(v)))`` -> ``Div(x, Sqrt(v))``: one rounding fewer, and the RMSNorm
    spelling ONNX Runtime's load-time fusion matches."""

    def pattern(self, op, x, v):
        return op.Mul(x, op.Reciprocal(op.Sqrt(v), _outputs=["inverse"]))

    def check(self, context, x, v, inverse, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if len(inverse.uses()) != 1 or inverse.is_graph_output():
            return result.fail("the reciprocal is read elsewhere too", inverse)
        return result

    def rewrite(self, op, x, v, **_):
        return op.Div(x, op.Sqrt(v))


ORT_NORM_SPELLING = pattern.RewriteRuleSet(DivByReciprocal.rule().commute())
