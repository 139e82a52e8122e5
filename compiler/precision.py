"""The precision a model computes in, and the rounding error that precision allows.

Two stages of one model may differ by rounding alone: a fused kernel sums in another
order than the ops it replaces, a thread pool splits a reduction differently. How large
that is depends on the precision: about 1e-7 relative per operation in float32, 5e-4 in
float16. The pass manager's checks (an exact rewrite's tolerance, the slack on a pass's
reported error) take their sizes from here, and the report states them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import onnx_ir as ir

from onnxpress.errors import OnnxpressError


@dataclass(frozen=True)
class Precision:
    name: str  # "float32", "float16", ...
    dtype: ir.DataType
    # relative L2 an exact (lossless) rewrite may move the outputs by
    lossless_tolerance: float
    # absolute rounding slack added to the error a pass reports before the re-measured one fails it
    rounding_slack: float

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "dtype"}


# Exact attention fusion, measured (bench/results/precision.json, lossless rows): float32
# MiniLM 7.3e-7, SmolLM2 9.8e-7; float16 MiniLM 1.0e-3, SmolLM2 5.9e-4. The tolerances leave
# about 10x (float32) and 5x (float16) of room over that.
PRECISIONS = {
    ir.DataType.FLOAT: Precision("float32", ir.DataType.FLOAT, 1e-5, 1e-6),
    ir.DataType.DOUBLE: Precision("float64", ir.DataType.DOUBLE, 1e-5, 1e-6),
    ir.DataType.FLOAT16: Precision("float16", ir.DataType.FLOAT16, 5e-3, 2e-3),
}


def compute_dtype(model: ir.Model) -> ir.DataType:
    """The float type most of the model's weights are stored in (float32 for a model without
    float weights): what its MatMuls compute in."""
    elements: dict[ir.DataType, int] = {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and tensor.dtype.is_floating_point():
            elements[tensor.dtype] = elements.get(tensor.dtype, 0) + tensor.size
    return max(elements, key=elements.get) if elements else ir.DataType.FLOAT


def model_precision(model: ir.Model) -> Precision:
    """The model's ``Precision``; a one-line error for one ONNX Runtime's CPU provider cannot run."""
    dtype = compute_dtype(model)
    if dtype not in PRECISIONS:
        name = dtype.name.lower()
        raise OnnxpressError(
            f"the model computes in {name}, which ONNX Runtime's CPU provider has no MatMul or Add kernels "
            f"for, so no stage could be run or verified: convert it to float16 or float32 first "
            f"(e.g. onnxpress export HF_DIR --dtype fp16)"
        )
    return PRECISIONS[dtype]
