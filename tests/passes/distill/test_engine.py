"""The distillation engine (``onnxpress.passes.distill.engine``): an ONNX graph run in PyTorch.

Checked against ONNX Runtime, never against stored outputs: the forward pass of every tiny
export (each arch with each exporter, decoders with and without a KV cache), of the models
the structural passes write, of single ops on hand-built graphs, and of MiniLM / SmolLM2;
then training: SGD lowers a distillation loss, ``write_back`` changes exactly the chosen
initializers, ORT computes what the trained module computed, and a shared initializer is
one Parameter whose gradient is the sum over its uses and stays one shared initializer.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import helper

from onnxpress.calibration import CalibrationSet, input_specs, is_past_input, make_feeds
from onnxpress.errors import OnnxpressError
from onnxpress.fidelity import compare_outputs
from onnxpress.model_io import load_model, session_model
from onnxpress.pass_infra import build_pass
from onnxpress.passes.distill.engine import OPS, TorchGraph, training_copy
from onnxpress.pipeline import CompileContext, Pipeline
from onnxpress.runtime import make_session, run_batches

from tiny_models import ALL_ARCHS, DECODER_ARCHS, EXPORTERS, IMAGE_SIZE, VOCAB, tiny_model

TOLERANCE = 1e-5  # relative L2 against ORT, as for lossless passes

# Every arch with every exporter, decoders also with a KV cache: ORT runs all of them. The
# dynamo ``opset=23`` exports are left out: ORT rejects llama's RotaryEmbedding (cos/sin cache
# shape), and bert's holds the ONNX ``Attention`` op, a fused attention the engine refuses
# (checked by test_unsupported_op_is_a_one_line_error).
EXPORTS = [(a, e, False) for a in ALL_ARCHS for e in EXPORTERS]
EXPORTS += [(a, e, True) for a in DECODER_ARCHS for e in EXPORTERS]
EXPORT_IDS = [f"{a}-{e}{'-past' if p else ''}" for a, e, p in EXPORTS]


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _feeds(model: ir.Model, seed: int = 0, batch: int = 2, seq: int = 7, past: int = 4,
           padded: bool = True) -> dict[str, np.ndarray]:
    """Random tokens (``padded``: the last row right-padded by two); where the model takes a KV
    cache, a random one of ``past`` steps (with the KV head count the model declares, pruned or not)."""
    rng = np.random.default_rng(seed)
    if any(v.name == "pixel_values" for v in model.graph.inputs):
        return {"pixel_values": rng.standard_normal((batch, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)}
    ids = rng.integers(5, VOCAB, (batch, seq), dtype=np.int64)
    mask = np.ones_like(ids)
    if padded:
        mask[-1, -2:] = 0
    caches = [s for s in input_specs(model) if is_past_input(s.name)]
    if not caches:
        return make_feeds(model, ids, mask, seed=seed)
    full_mask = np.concatenate([np.ones((batch, past), np.int64), mask], 1)
    feeds = dict(make_feeds(model, ids, full_mask, seed=seed))
    if "position_ids" in feeds:  # make_feeds numbers the whole mask; the new tokens are the last ``seq``
        feeds["position_ids"] = np.ascontiguousarray(feeds["position_ids"][:, -seq:])
    for spec in caches:
        feeds[spec.name] = rng.standard_normal((batch, spec.shape[1], past, spec.shape[3])).astype(np.float32)
    return feeds


def _torch_outputs(graph: TorchGraph, batches, outputs=None) -> list[dict[str, np.ndarray]]:
    with torch.no_grad():
        return [{k: v.numpy() for k, v in graph(feeds, outputs).items()} for feeds in batches]


def _ort_outputs(model: ir.Model, batches, outputs=None) -> list[dict[str, np.ndarray]]:
    return run_batches(make_session(model, threads=1), batches, outputs)


def _assert_matches_ort(ref, out, tol: float = TOLERANCE) -> None:
    """Same outputs, shapes and dtypes; integer and bool outputs equal; floats within ``tol``."""
    for r, o in zip(ref, out, strict=True):
        assert list(r) == list(o)
        for name in r:
            assert o[name].shape == r[name].shape and o[name].dtype == r[name].dtype, name
            if not np.issubdtype(r[name].dtype, np.floating):
                np.testing.assert_array_equal(o[name], r[name], err_msg=name)
    if any(np.issubdtype(a.dtype, np.floating) for a in ref[0].values()):
        assert compare_outputs(ref, out).rel_l2 <= tol


def _compress(model: ir.Model, name: str, settings: dict) -> None:
    """Run one pass through the pipeline (which verifies the saved stage in ORT)."""
    calib = CalibrationSet.synthetic(model, batch_size=4, seq_len=12, num_batches=4, seed=1)
    verification = CalibrationSet.synthetic(model, batch_size=2, seq_len=12, seed=2).batches
    ctx = CompileContext(verification=verification, calibration=calib, threads=1)
    (result,) = Pipeline([build_pass(name, settings)], progress=False).run(model, ctx)
    assert result.modified, f"{name} changed nothing: the test would check nothing"


# ------------------------------------------------------------------------------- forward


@pytest.mark.parametrize(("arch", "exporter", "past"), EXPORTS, ids=EXPORT_IDS)
def test_forward_matches_ort_on_every_tiny_export(arch, exporter, past):
    model = load_model(tiny_model(arch, exporter, with_past=past))
    batches = [_feeds(model, seed) for seed in (0, 1)]
    _assert_matches_ort(_ort_outputs(model, batches), _torch_outputs(TorchGraph(model), batches))


@pytest.mark.parametrize(("arch", "exporter", "past"), EXPORTS, ids=EXPORT_IDS)
def test_training_copy_computes_what_ort_computes_on_every_tiny_export(arch, exporter, past):
    model = load_model(tiny_model(arch, exporter, with_past=past))
    batches = [_feeds(model, seed) for seed in (0, 1)]
    _assert_matches_ort(_ort_outputs(model, batches), _torch_outputs(TorchGraph(training_copy(model)), batches))


def test_training_copy_fuses_erf_gelus_and_leaves_the_model_as_it_was():
    model = load_model(tiny_model("bert", "optimum"))
    ops = [n.op_type for n in model.graph]
    copy = [n.op_type for n in training_copy(model).graph]
    assert ops.count("Erf") > 0 and "Gelu" not in ops
    assert copy.count("Gelu") == ops.count("Erf") and "Erf" not in copy
    assert [n.op_type for n in model.graph] == ops


def test_dynamic_sizes_run_through_one_module():
    """The shape subgraphs run on the actual sizes: one module serves any batch, sequence and cache length."""
    model = load_model(tiny_model("llama", "optimum", with_past=True))
    graph = TorchGraph(model)
    batches = [_feeds(model, 0, batch=1, seq=3, past=2), _feeds(model, 1, batch=3, seq=11, past=0),
               _feeds(model, 2, batch=2, seq=1, past=9)]
    _assert_matches_ort(_ort_outputs(model, batches), _torch_outputs(graph, batches))


def test_named_intermediate_values_match_ort():
    """``outputs=[...]`` returns inner values (hidden states for a distillation loss)."""
    model = load_model(tiny_model("bert", "optimum"))
    hidden = [n.outputs[0].name for n in model.graph if n.op_type == "LayerNormalization"]
    assert len(hidden) >= 3
    probe = model.clone()
    values = {v.name: v for n in probe.graph for v in n.outputs}
    probe.graph.outputs.extend(values[name] for name in hidden)
    batches = [_feeds(model)]
    ref = _ort_outputs(probe, batches, hidden)
    _assert_matches_ort(ref, _torch_outputs(TorchGraph(model), batches, hidden))


STRUCTURAL = [
    ("lowrank", {"fraction": 0.2}),
    ("share_weights", {"fraction": 0.25}),
    ("prune_heads", {"fraction": 0.5}),
    ("prune_ffn", {"fraction": 0.5}),
]


@pytest.mark.parametrize(("name", "settings"), STRUCTURAL, ids=[n for n, _ in STRUCTURAL])
@pytest.mark.parametrize(("arch", "past"), [("llama", True), ("bert", False)], ids=["llama-past", "bert"])
def test_forward_matches_ort_after_structural_passes(arch, past, name, settings):
    model = load_model(tiny_model(arch, with_past=past))
    _compress(model, name, settings)
    batches = [_feeds(model, seed) for seed in (3, 4)]
    _assert_matches_ort(_ort_outputs(model, batches), _torch_outputs(TorchGraph(model), batches))


# ------------------------------------------------------------------------ single ops vs ORT


def _f32(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _f16(*shape, seed=0):
    return _f32(*shape, seed=seed).astype(np.float16)


def _vectors(shape, count):
    shape = shape if isinstance(shape, tuple) else (shape,)
    return [_f32(*shape, seed=10 + i) for i in range(count)]


def _i64(*values):
    return np.array(values, np.int64)


def _idx(nested):
    return np.array(nested, np.int64)


def _scalar(value, dtype=np.int64):
    return np.array(value, dtype)


I64_MAX = np.iinfo(np.int64).max
ONES_TIES = np.array([[1, 3, 3, 0], [2, 2, 1, 2]], np.float32)

# (op, inputs (None: an omitted optional input), attributes, number of outputs, opset, domain)
OP_CASES = {
    "Trilu-lower-k": ("Trilu", [_f32(2, 3, 4), _scalar(1)], {"upper": 0}),
    "Trilu-upper": ("Trilu", [_f32(3, 5)], {}),
    "Einsum": ("Einsum", [_f32(2, 3, 4), _f32(2, 4, 5, seed=1)], {"equation": "bij,bjk->bik"}),
    "ScatterND": ("ScatterND", [_f32(4, 3), _idx([[1], [-1]]), _f32(2, 3, seed=1)], {}),
    "GatherND-batch": ("GatherND", [_f32(2, 3, 4), _idx([[[1], [2]], [[0], [-1]]])], {"batch_dims": 1}),
    "GatherND-pairs": ("GatherND", [_f32(3, 4, 2), _idx([[0, 1], [2, -1]])], {}),
    "GatherElements": ("GatherElements", [_f32(3, 4), _idx([[0, -1], [2, 1], [3, 3]])], {"axis": 1}),
    "Gather-scalar-negative": ("Gather", [_f32(3, 4), _scalar(-1)], {"axis": 1}),
    "Gather-matrix-indices": ("Gather", [_f32(5, 2), _idx([[0, 4], [-2, 1]])], {}),
    "Tile": ("Tile", [_f32(2, 3), _i64(2, 1)], {}),
    "Clip-inputs": ("Clip", [_f32(3, 4), _scalar(-0.5, np.float32), _scalar(0.5, np.float32)], {}),
    "Clip-max-only": ("Clip", [_f32(3, 4), None, _scalar(0.2, np.float32)], {}),
    "Clip-attributes": ("Clip", [_f32(3, 4)], {"min": -0.3, "max": 0.1}, 1, 6),
    "Split-sizes": ("Split", [_f32(2, 7, 3), _i64(2, 5)], {"axis": 1}, 2),
    "Split-uneven-num_outputs": ("Split", [_f32(2, 7, 3)], {"axis": 1, "num_outputs": 3}, 3),
    "Split-attribute": ("Split", [_f32(7, 2)], {"split": [3, 4]}, 2, 11),
    "Split-equal": ("Split", [_f32(6, 2)], {}, 3, 13),
    "Slice-negative-steps": ("Slice", [_f32(5, 6), _i64(-1, 4), _i64(-100, 0), _i64(0, 1), _i64(-2, -1)], {}),
    "Slice-clamped-end": ("Slice", [_f32(3, 7), _i64(1), _i64(I64_MAX), _i64(-1), _i64(2)], {}),
    "Slice-attributes": ("Slice", [_f32(4, 5)], {"starts": [1], "ends": [-1], "axes": [1]}, 1, 9),
    "ArgMax-last-index": ("ArgMax", [ONES_TIES], {"axis": 1, "keepdims": 0, "select_last_index": 1}),
    "ArgMin": ("ArgMin", [ONES_TIES], {"axis": 0}),
    "CumSum-exclusive-reverse": ("CumSum", [_f32(2, 5), _scalar(1)], {"exclusive": 1, "reverse": 1}),
    "CumSum-int": ("CumSum", [_i64(1, 0, 1, 1, 0), _scalar(-1)], {}),
    "Conv-pads-groups": ("Conv", [_f32(1, 4, 6, 6), _f32(4, 2, 3, 3, seed=1), _f32(4, seed=2)],
                         {"pads": [1, 0, 0, 2], "strides": [2, 1], "group": 2, "dilations": [1, 2]}),
    "Conv-1d-valid": ("Conv", [_f32(2, 3, 9), _f32(5, 3, 2, seed=1)], {"auto_pad": "VALID"}),
    "Gemm-transposed": ("Gemm", [_f32(4, 3), _f32(5, 4, seed=1), _f32(5, seed=2)],
                        {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0}),
    "Gemm-no-bias": ("Gemm", [_f32(3, 4), _f32(4, 5, seed=1)], {}),
    "MatMul-batched-1d": ("MatMul", [_f32(2, 3, 4), _f32(4, seed=1)], {}),
    "ReduceMax-axes-attribute": ("ReduceMax", [_f32(2, 3, 4)], {"axes": [0, 2], "keepdims": 0}, 1, 13),
    "ReduceMean-all": ("ReduceMean", [_f32(2, 3, 4)], {}),
    "ReduceSum-noop": ("ReduceSum", [_f32(2, 3), np.zeros(0, np.int64)], {"noop_with_empty_axes": 1}),
    "ReduceSum-int": ("ReduceSum", [_i64(1, 2, 3), _i64(0)], {"keepdims": 0}),
    "ReduceMin": ("ReduceMin", [_f32(2, 3, 4), _i64(-1)], {}),
    "ReduceProd": ("ReduceProd", [_f32(2, 3, 4), _i64(0, 2)], {}),
    "ReduceL2": ("ReduceL2", [_f32(2, 3, 4), _i64(1)], {}),
    "ReduceSumSquare": ("ReduceSumSquare", [_f32(2, 3, 4), _i64(1)], {"keepdims": 0}),
    "ReduceLogSumExp": ("ReduceLogSumExp", [_f32(2, 3, 4), _i64(2)], {}),
    "Unsqueeze-attribute": ("Unsqueeze", [_f32(2, 3)], {"axes": [0, -1]}, 1, 11),
    "Unsqueeze-input": ("Unsqueeze", [_f32(2, 3), _i64(3, 1)], {}),
    "Squeeze-all": ("Squeeze", [_f32(1, 3, 1, 2)], {}),
    "Squeeze-axes": ("Squeeze", [_f32(1, 3, 1, 2), _i64(-2)], {}),
    "Softmax-opset11-flattens": ("Softmax", [_f32(2, 3, 4)], {"axis": 1}, 1, 11),
    "Softmax": ("Softmax", [_f32(2, 3, 4)], {"axis": 1}),
    "LogSoftmax": ("LogSoftmax", [_f32(2, 3, 4)], {"axis": 0}),
    "Flatten-negative-axis": ("Flatten", [_f32(2, 3, 4)], {"axis": -1}),
    "Flatten-zero-axis": ("Flatten", [_f32(2, 3, 4)], {"axis": 0}),
    "Range-float": ("Range", [_scalar(0.5, np.float32), _scalar(3.1, np.float32), _scalar(0.7, np.float32)],
                    {}),
    "Range-int-down": ("Range", [_scalar(10), _scalar(1), _scalar(-3)], {}),
    "Range-empty": ("Range", [_scalar(5), _scalar(1), _scalar(2)], {}),
    "ConstantOfShape-int": ("ConstantOfShape", [_i64(2, 3)],
                            {"value": helper.make_tensor("v", onnx.TensorProto.INT64, [1], [7])}),
    "ConstantOfShape-default": ("ConstantOfShape", [_i64(3)], {}),
    "Constant-floats": ("Constant", [], {"value_floats": [1.5, -2.0]}),
    "Constant-int": ("Constant", [], {"value_int": 4}),
    "Expand-both-ways": ("Expand", [_f32(3, 1), _i64(2, 1, 4)], {}),
    "Reshape-zero-and-minus-one": ("Reshape", [_f32(2, 3, 4), _i64(0, -1)], {}),
    "Reshape-allowzero": ("Reshape", [np.zeros((0, 3), np.float32), _i64(3, 0)], {"allowzero": 1}),
    "Transpose-default": ("Transpose", [_f32(2, 3, 4)], {}),
    "Concat-with-empty": ("Concat", [_f32(2, 3), _f32(2, 1, seed=1), _f32(2, 0)], {"axis": -1}),
    "Shape-start-end": ("Shape", [_f32(2, 3, 4, 5)], {"start": 1, "end": -1}),
    "Size": ("Size", [_f32(2, 3)], {}),
    "Mod-fmod": ("Mod", [_f32(3, 4), _scalar(0.7, np.float32)], {"fmod": 1}),
    "Mod-int": ("Mod", [_i64(-7, 7, -3, 5), _i64(3, -3, 3, 5)], {}),
    "Div-int-truncates": ("Div", [_i64(-7, 7, -3, 5), _i64(2, -2, 3, 3)], {}),
    "Pow-int-exponent": ("Pow", [_f32(3, 4), _scalar(3)], {}),
    "Where": ("Where", [_f32(3, 4) > 0, _f32(3, 4, seed=1), _f32(1, 4, seed=2)], {}),
    "IsInf": ("IsInf", [np.array([1.0, np.inf, -np.inf, np.nan], np.float32)], {"detect_negative": 0}),
    "IsNaN": ("IsNaN", [np.array([1.0, np.inf, np.nan], np.float32)], {}),
    "Max-variadic": ("Max", [_f32(3, 4), _f32(4, seed=1), _f32(3, 1, seed=2)], {}),
    "Min-variadic": ("Min", [_f32(3, 4), _f32(4, seed=1), _f32(3, 1, seed=2)], {}),
    "Sum": ("Sum", [_f32(3, 4), _f32(4, seed=1), _f32(3, 1, seed=2)], {}),
    "Mean": ("Mean", [_f32(3, 4), _f32(4, seed=1)], {}),
    "HardSigmoid": ("HardSigmoid", [_f32(3, 4)], {"alpha": 0.3}),
    "LeakyRelu": ("LeakyRelu", [_f32(3, 4)], {"alpha": 0.1}),
    "Gelu-tanh": ("Gelu", [_f32(3, 4)], {"approximate": "tanh"}, 1, 20),
    "Cast-truncates": ("Cast", [np.array([-1.7, 2.5, 0.2], np.float32)], {"to": onnx.TensorProto.INT64}),
    "Cast-bool": ("Cast", [np.array([-1.7, 0.0, 0.2], np.float32)], {"to": onnx.TensorProto.BOOL}),
    "CastLike": ("CastLike", [_i64(1, 2), np.zeros(1, np.float32)], {}),
    "Xor": ("Xor", [np.array([True, False, True]), np.array([True, True, False])], {}),
    "GreaterOrEqual": ("GreaterOrEqual", [_i64(1, 2, 3), _i64(2)], {}),
    "Dropout-mask": ("Dropout", [_f32(3, 4)], {}, 2),
    "LayerNormalization-stats": ("LayerNormalization", [_f32(2, 3, 4), *_vectors((3, 4), 2)],
                                 {"axis": 1, "epsilon": 1e-3}, 3, 17),
    "LayerNormalization-axis": ("LayerNormalization", [_f32(2, 3, 4), *_vectors((3, 4), 2)], {"axis": 1}, 1, 17),
    "LayerNormalization-fp16": ("LayerNormalization", [_f16(2, 8), _f16(8, seed=1), _f16(8, seed=2)], {},
                                1, 17),
    "MatMul-fp16": ("MatMul", [_f16(2, 3, 8), _f16(8, 4, seed=1)], {}),
    "Add-fp16": ("Add", [_f16(2, 3), _f16(3, seed=1)], {}),
    "RMSNormalization": ("RMSNormalization", [_f32(2, 3, 8), _f32(8, seed=1)], {"epsilon": 1e-4}, 1, 23),
    "SimplifiedLayerNormalization": ("SimplifiedLayerNormalization", [_f32(2, 3, 8), _f32(8, seed=1)], {},
                                     1, 17),
    "FusedMatMul": ("FusedMatMul", [_f32(2, 4, 3), _f32(2, 5, 4, seed=1)],
                    {"transA": 1, "transB": 1, "alpha": 0.25}, 1, 17, "com.microsoft"),
    "Gelu-ms": ("Gelu", [_f32(3, 4)], {}, 1, 17, "com.microsoft"),
    "FastGelu": ("FastGelu", [_f32(3, 4), _f32(4, seed=1)], {}, 1, 17, "com.microsoft"),
    "BiasGelu": ("BiasGelu", [_f32(3, 4), _f32(4, seed=1)], {}, 1, 17, "com.microsoft"),
    "QuickGelu": ("QuickGelu", [_f32(3, 4)], {"alpha": 1.5}, 1, 17, "com.microsoft"),
    "SkipLayerNormalization": ("SkipLayerNormalization",
                               [_f32(2, 3, 8), _f32(2, 3, 8, seed=1), *_vectors(8, 3)],
                               {"epsilon": 1e-4}, 4, 17, "com.microsoft"),
    "SkipSimplifiedLayerNormalization": ("SkipSimplifiedLayerNormalization",
                                         [_f32(2, 3, 8), _f32(2, 3, 8, seed=1), *_vectors(8, 2)],
                                         {}, 1, 17, "com.microsoft"),
}
# plain elementwise ops on one input (positive where the op needs it)
for _op in ["Neg", "Abs", "Sign", "Floor", "Ceil", "Round", "Sqrt", "Reciprocal", "Exp", "Log", "Erf", "Cos",
            "Sin", "Tanh", "Sigmoid", "Relu", "Softplus", "Identity"]:
    OP_CASES[_op] = (_op, [np.abs(_f32(3, 4)) + 0.1 if _op in ("Sqrt", "Log") else 3 * _f32(3, 4)], {})
for _op in ["Equal", "Less", "LessOrEqual", "Greater", "Sub", "Mul"]:  # float versions run in every export
    OP_CASES[_op] = (_op, [_i64(1, 2, 3), _i64(2, 2, 1)], {})
for _op in ["And", "Or"]:
    OP_CASES[_op] = (_op, [np.array([True, False, True]), np.array([True, True, False])], {})
OP_CASES["Not"] = ("Not", [np.array([True, False])], {})


def _single_op_model(op, inputs, attrs, n_out=1, opset=18, domain="") -> tuple[onnx.ModelProto, dict]:
    names = [f"x{i}" if a is not None else "" for i, a in enumerate(inputs)]
    node = helper.make_node(op, names, [f"y{i}" for i in range(n_out)], domain=domain, **attrs)
    graph = helper.make_graph(
        [node], op,
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
         for n, a in zip(names, inputs, strict=True) if a is not None],
        [helper.make_empty_tensor_value_info(f"y{i}") for i in range(n_out)],  # ORT infers the types
    )
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model, {n: a for n, a in zip(names, inputs, strict=True) if a is not None}


@pytest.mark.parametrize("case", list(OP_CASES))
def test_single_op_matches_ort(case):
    proto, feeds = _single_op_model(*OP_CASES[case])
    ref = run_batches(make_session(proto.SerializeToString(), threads=1), [feeds])
    out = _torch_outputs(TorchGraph(ir.from_proto(proto)), [feeds])
    half = any(a.dtype == np.float16 for a in feeds.values())  # float16 keeps ~3 significant digits
    _assert_matches_ort(ref, out, tol=1e-3 if half else TOLERANCE)


def test_every_implemented_op_is_checked_against_ort():
    """No op in the dispatch table goes unchecked: each one has a single-op case above."""
    checked = {f"{rest[2]}.{op}" if len(rest) > 2 and rest[2] else op
               for op, _, _, *rest in OP_CASES.values()}
    assert set(OPS) - checked == set()


# ------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def shared_llama() -> tuple[ir.Model, ir.Model]:
    """(teacher, student): tiny llama with a KV cache, and the same after share_weights, where
    one initializer of each shared group is read by the MatMuls of two layers."""
    teacher = load_model(tiny_model("llama", with_past=True))
    student = teacher.clone()
    _compress(student, "share_weights", {"fraction": 0.25, "share": ["ffn.up", "ffn.gate", "attn.q"]})
    return teacher, student


def _snapshot(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: np.array(v.const_value.numpy()) for name, v in model.graph.initializers.items()}


def _structure(model: ir.Model) -> list[tuple]:
    return [(n.op_type, n.domain, tuple(v.name if v else "" for v in n.inputs),
             tuple(v.name for v in n.outputs), tuple(sorted(n.attributes))) for n in model.graph]


def _shared_initializers(model: ir.Model) -> dict[str, list[str]]:
    """Float initializers read by more than one node -> the names of those nodes."""
    shared = {}
    for name, value in model.graph.initializers.items():
        users = sorted(use.node.name for use in value.uses())
        if value.const_value.dtype.is_floating_point() and len(users) > 1:
            shared[name] = users
    return shared


def _kl_loss(logits: torch.Tensor, target: np.ndarray) -> torch.Tensor:
    """Distillation loss: KL(teacher || student) of the next-token distributions."""
    teacher = torch.log_softmax(torch.from_numpy(target), -1)
    student = torch.log_softmax(logits, -1)
    return torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")


def test_sgd_trains_exactly_the_chosen_initializers(shared_llama, two_threads):
    teacher, student = shared_llama[0], shared_llama[1].clone()
    batches = [_feeds(student, seed) for seed in (10, 11)]
    targets = [out["logits"] for out in _ort_outputs(teacher, batches, ["logits"])]
    matmul_weights = {v.name for n in student.graph if n.op_type == "MatMul" for v in n.inputs
                      if v is not None and v.is_initializer()}
    norms = {v.name for n in student.graph if n.op_type == "Mul" for v in n.inputs
             if v is not None and v.is_initializer() and v.name.endswith("norm.weight")}
    chosen = matmul_weights | norms
    assert len(chosen) > 10 and norms and set(_shared_initializers(student)) & chosen
    before, structure = _snapshot(student), _structure(student)

    graph = TorchGraph(student, trainable=chosen)
    assert set(graph.trainable_parameters()) == chosen
    optimizer = torch.optim.SGD(graph.parameters(), lr=0.02)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = sum(_kl_loss(graph(feeds)["logits"], target)
                   for feeds, target in zip(batches, targets, strict=True))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < 0.75 * losses[0], losses

    assert graph.write_back(student) == len(chosen)
    after = _snapshot(student)
    assert _structure(student) == structure and list(after) == list(before)
    for name, array in after.items():
        assert array.dtype == before[name].dtype and array.shape == before[name].shape
        if name in chosen:
            assert not np.array_equal(array, before[name]), f"{name} was trainable but did not change"
        else:
            assert array.tobytes() == before[name].tobytes(), f"{name} was not trainable but changed"

    # the written-back model is valid, loads in ORT and computes what the trained module computes
    proto = onnx.load_from_string(session_model(student).proto)
    onnx.checker.check_model(proto)
    fresh = [_feeds(student, seed) for seed in (12, 13)]
    ort_out = run_batches(make_session(proto.SerializeToString(), threads=1), fresh)
    _assert_matches_ort(ort_out, _torch_outputs(graph, fresh))


def _untie(model: ir.Model, names) -> dict[str, list[str]]:
    """Give every use of each initializer in ``names`` its own copy; returns name -> copy names."""
    copies: dict[str, list[str]] = {}
    for name in names:
        value = model.graph.initializers[name]
        for k, use in enumerate(list(value.uses())):
            array = np.array(value.const_value.numpy())
            copy = ir.Value(name=f"{name}.use{k}", shape=value.shape, type=value.type,
                            const_value=ir.tensor(array, name=f"{name}.use{k}"))
            model.graph.register_initializer(copy)
            use.node.replace_input_with(use.idx, copy)
            copies.setdefault(name, []).append(copy.name)
    return copies


def test_shared_initializer_is_one_parameter_and_stays_shared(shared_llama):
    student = shared_llama[1].clone()
    shared = _shared_initializers(student)
    assert shared and all(len(users) == 2 for users in shared.values())
    feeds = _feeds(student, 20)

    graph = TorchGraph(student, trainable=shared)
    assert len(list(graph.parameters())) == len(shared)  # one Parameter per initializer, not per use
    graph(feeds)["logits"].square().mean().backward()

    # its gradient is the sum of the gradients of separate copies, one per use
    untied = shared_llama[1].clone()
    copies = _untie(untied, shared)
    separate = TorchGraph(untied, trainable=[c for names in copies.values() for c in names])
    separate(feeds)["logits"].square().mean().backward()
    grads = {name: p.grad for name, p in separate.trainable_parameters().items()}
    for name, param in graph.trainable_parameters().items():
        summed = sum(grads[c] for c in copies[name])
        assert param.grad.abs().max() > 0
        torch.testing.assert_close(param.grad, summed, rtol=1e-4, atol=1e-7)

    with torch.no_grad():
        for param in graph.parameters():
            param -= 0.1 * param.grad
    before = _snapshot(student)
    assert graph.write_back(student) == len(shared)
    assert _shared_initializers(student) == shared  # still one initializer, read by the same nodes
    after = _snapshot(student)
    assert all(not np.array_equal(after[n], before[n]) for n in shared)
    proto = onnx.load_from_string(session_model(student).proto)
    assert sorted(t.name for t in proto.graph.initializer) == sorted(before)  # nothing duplicated
    batches = [_feeds(student, 21)]
    _assert_matches_ort(run_batches(make_session(proto.SerializeToString(), threads=1), batches),
                        _torch_outputs(graph, batches))


def test_trainable_names_must_be_float_initializers():
    model = load_model(tiny_model("bert"))
    with pytest.raises(OnnxpressError, match="not a float initializer"):
        TorchGraph(model, trainable=["no.such.weight"])


def test_forward_is_deterministic():
    model = load_model(tiny_model("gpt2", with_past=True))
    feeds = _feeds(model, 5)
    graph = TorchGraph(model)
    first, second = _torch_outputs(graph, [feeds]), _torch_outputs(TorchGraph(model), [feeds])
    for name, array in first[0].items():
        assert array.tobytes() == second[0][name].tobytes(), name


# ---------------------------------------------------------------------------- refused ops


def _fused_attention() -> ir.Model:
    model = load_model(tiny_model("bert"))
    _compress(model, "attention", {})
    return model


def _quantized() -> ir.Model:
    model = load_model(tiny_model("bert"))
    _compress(model, "quantize", {"mode": "dynamic", "gptq": False, "smooth": False})
    return model


REFUSED = {
    "onnx-attention": (lambda: load_model(tiny_model("bert", "dynamo", opset=23)), "Attention"),
    "fused-attention": (_fused_attention, "(com.microsoft)"),
    "quantized": (_quantized, "DynamicQuantizeLinear"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_op_is_a_one_line_error(case):
    build, op = REFUSED[case]
    model = build()
    with pytest.raises(OnnxpressError) as info:
        TorchGraph(model)
    message = str(info.value)
    assert "\n" not in message and op in message
    assert "before attention fusion and quantization" in message


# ------------------------------------------------------------------------------ real models


@pytest.mark.real_model
def test_minilm_forward_matches_ort(minilm_onnx, two_threads):
    model = load_model(minilm_onnx)
    batches = [_feeds(model, seed, batch=2, seq=24) for seed in (0, 1)]
    _assert_matches_ort(_ort_outputs(model, batches), _torch_outputs(TorchGraph(model), batches))


@pytest.mark.real_model
def test_smollm2_decoding_through_its_own_cache_matches_ort(smollm2_onnx, two_threads):
    """30 layers with GQA: a prompt, then more tokens through the KV cache the prompt wrote
    (a random cache through 30 layers would test rounding noise more than the engine)."""
    model = load_model(smollm2_onnx)
    graph = TorchGraph(model)
    prompt = _feeds(model, 0, seq=6, past=0, padded=False)
    ref = _ort_outputs(model, [prompt])
    _assert_matches_ort(ref, _torch_outputs(graph, [prompt]))
    step = _feeds(model, 1, seq=5, past=6, padded=False)
    for name in [n for n in step if n.startswith("past_key_values.")]:
        step[name] = ref[0][name.replace("past_key_values", "present")]
    _assert_matches_ort(_ort_outputs(model, [step]), _torch_outputs(graph, [step]))
