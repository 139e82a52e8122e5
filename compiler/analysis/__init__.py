"""Find the transformer in an ONNX graph: the map every pass stands on.

``analyze(model)`` returns a :class:`TransformerMap`: per layer the attention
block (Q/K/V/O projections, head counts, head size, scale, mask, rotary, KV cache)
and the FFN (up / gate / down, activation), norms and residual adds, plus parameter
and MAC counts. Matching is structural (dataflow), so optimum, torch.onnx
TorchScript and dynamo exports, ONNX Runtime fused graphs and hand-built graphs are
read alike. ``graph_utils`` holds the helpers (constant lookup, weight lookup,
walks) for pass authors.
"""

from onnxpress.analysis.attention import LinearIndex
from onnxpress.analysis.cost import attention_macs, count_macs, count_params, linear_macs
from onnxpress.analysis.linear import as_linear
from onnxpress.analysis.norms import Norm, find_norms
from onnxpress.analysis.structures import FFN, Attention, Extra, Layer, Linear, TransformerMap
from onnxpress.analysis.transformer import analyze

__all__ = [
    "FFN",
    "Attention",
    "Extra",
    "Layer",
    "Linear",
    "LinearIndex",
    "Norm",
    "TransformerMap",
    "analyze",
    "as_linear",
    "attention_macs",
    "count_macs",
    "count_params",
    "find_norms",
    "linear_macs",
]
