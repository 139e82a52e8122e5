"""Find the transformer in an ONNX graph: the map every pass stands on.

``analyze(model)`` returns a :class:`TransformerMap`: per layer the attention
block (Q/K/V/O projections, head counts, head size, scale, mask, rotary, KV cache)
and the FFN (up / gate / down, activation), norms and residual adds, plus parameter
and MAC counts. Matching is structural (dataflow), so optimum, torch.onnx
TorchScript and dynamo exports, ONNX Runtime fused graphs and hand-built graphs are
read alike. ``graph_utils`` holds the helpers (constant lookup, weight lookup,
walks) for pass authors; ``fused_attention`` the table of fused attention ops.

Attention matching: ``attention`` (the finder) runs ``attention_decomposed`` on each
Softmax and ``attention_fused`` on each fused node; they share ``attention_paths`` (walks
to the projections), ``attention_scores`` (scores chain, scale), ``attention_operands``
(the Q/K/V a fused op reads), ``attention_heads`` (head geometry) and ``attention_masks``.
"""

from onnxpress.analysis.attention.fused_ops import FusedAttentionSpec, spec_for
from onnxpress.analysis.cost import attention_macs, count_macs, count_params, linear_macs
from onnxpress.analysis.linear import LinearIndex, as_linear
from onnxpress.analysis.norms import Norm, find_norms
from onnxpress.analysis.structures import (
    FFN,
    Attention,
    Extra,
    Layer,
    Linear,
    MaskTerm,
    OperandPath,
    ScaleFactor,
    TransformerMap,
)
from onnxpress.analysis.transformer import analyze

__all__ = [
    "FFN",
    "Attention",
    "Extra",
    "FusedAttentionSpec",
    "Layer",
    "Linear",
    "LinearIndex",
    "MaskTerm",
    "Norm",
    "OperandPath",
    "ScaleFactor",
    "TransformerMap",
    "analyze",
    "as_linear",
    "attention_macs",
    "count_macs",
    "count_params",
    "find_norms",
    "linear_macs",
    "spec_for",
]
