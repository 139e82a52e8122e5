"""Did ONNX Runtime turn our Q/DQ patterns into integer kernels?

QDQ is only a promise: ORT's CPU provider must recognise each pattern and replace it
with an integer kernel, otherwise the model runs the float MatMul plus extra
quantise/dequantise work (slower than fp32). We let ORT optimise the model into a file
(``optimized_model_filepath``) and count what it produced. Weight-only kernels are counted in the
graph itself (``graph_kernel_report``): ORT runs them as written.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxpress.model_io import SessionModel, session_model
from onnxpress.runtime import make_session, session_options

INTEGER_KERNELS = (
    "QLinearMatMul",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "MatMulInteger",
    "MatMulNBits",
    "QGemm",
    "QAttention",
    "DynamicQuantizeLSTM",
)


def fusion_report(model, level: str = "extended") -> dict:
    """Op counts of ORT's optimised graph: integer kernels, and Q/DQ nodes left standing
    in front of float ops (unfused pairs), by the op they feed."""
    source = SessionModel(model.SerializeToString()) if isinstance(model, onnx.ModelProto) else session_model(model)
    with tempfile.TemporaryDirectory(prefix="onnxpress-fusion-") as tmp:
        dst = Path(tmp) / "optimized.onnx"
        opts = session_options(int(os.environ.get("ONNXPRESS_THREADS", "1") or 1))
        opts.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if level == "all"
            else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        )
        opts.optimized_model_filepath = str(dst)
        # the weights in a file beside it: a model over the protobuf limit could not be written otherwise
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
        make_session(source, options=opts)  # registers onnxpress's ops library when the model uses it
        optimized = onnx.load(str(dst), load_external_data=False)
    return _kernel_counts([(n.op_type, list(n.input), list(n.output)) for n in optimized.graph.node])


def graph_kernel_report(model: ir.Model) -> dict:
    """``fusion_report``'s counts read from ``model``'s own graph, for weight-only kernels
    (MatMulNBits, GatherBlockQuantized) that ONNX Runtime runs as written. No session: ORT's
    optimised copy would materialise every weight handed over in memory (5.2 GB for a 7.4 B
    model's int4 weights mapped from a spill file, against 0.4 GB when ORT maps them itself)."""
    return _kernel_counts([(n.op_type, [v.name if v is not None else "" for v in n.inputs],
                            [v.name for v in n.outputs]) for n in ir.traversal.RecursiveGraphIterator(model.graph)])


def _kernel_counts(nodes: list[tuple[str, list[str], list[str]]]) -> dict:
    """Integer kernels, and DequantizeLinear outputs feeding float ops by the op they feed, among
    ``nodes`` given as (op type, input names, output names)."""
    ops = Counter(op for op, _, _ in nodes)
    consumers: dict[str, list[str]] = {}
    for op, inputs, _ in nodes:
        for i in inputs:
            consumers.setdefault(i, []).append(op)
    unfused = Counter()
    for op, _, outputs in nodes:
        if op == "DequantizeLinear":
            for out in outputs:
                for consumer in consumers.get(out, []):
                    unfused[consumer] += 1
    return {
        "integer_kernels": {op: ops[op] for op in INTEGER_KERNELS if ops[op]},
        "fused": sum(ops[op] for op in INTEGER_KERNELS),
        "unfused_dq_consumers": dict(unfused),
        "unfused": sum(unfused.values()),
        "quantize_linear_left": ops["QuantizeLinear"],
        "dynamic_quantize_left": ops["DynamicQuantizeLinear"],
    }
