"""Half-precision models through every pass family.

A float16 encoder and a float16 decoder with its KV cache (converted as ``onnxpress export
--dtype fp16`` converts) compile through pruning, low-rank splitting, weight sharing,
distillation, attention fusion and each quantization mode. The pipeline verifies every stage
in ONNX Runtime against the previous one, within the float16 rounding the report states;
what is not quantized stays float16; a bfloat16 model, which ONNX Runtime's CPU provider
cannot run, is refused in one line.
"""

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxpress.calibration import make_feeds
from onnxpress.compile import compile_model
from onnxpress.errors import OnnxpressError
from onnxpress.model_io import load_model, save_model
from onnxpress.precision import PRECISIONS
from onnxpress.runtime import make_session, run_batches

from tiny_models import VOCAB, greedy_tokens, tiny_model, tiny_model_fp16

FLOAT16 = PRECISIONS[ir.DataType.FLOAT16]
DISTILL = "distill:steps=10,eval_every=5,lr=1e-3,batch_size=4,max_length=32"
STRUCTURAL = ["cleanup", "prune_heads:fraction=0.25", "prune_ffn:fraction=0.25", "lowrank:fraction=0.1",
              "share_weights:fraction=0.3", DISTILL]
QUANTIZE = {
    "dynamic": ["attention:optional=true", "quantize:mode=dynamic"],
    "static": ["attention:optional=true", "quantize:mode=static"],
    "weight_only": ["attention:optional=true", "quantize:mode=weight_only,bits=4,lm_head_bits=8"],
}
CASES = [("bert", False), ("llama", True)]


def _calibration(tmp_path):
    path = tmp_path / "ids.npz"
    np.savez(path, input_ids=np.random.default_rng(0).integers(5, VOCAB, (16, 32)))
    return path


def _float_initializer_types(path) -> set[int]:
    model = onnx.load(path)
    return {t.data_type for t in model.graph.initializer
            if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and len(t.dims) >= 2}


@pytest.mark.parametrize(("arch", "past"), CASES, ids=[a for a, _ in CASES])
@pytest.mark.parametrize("mode", list(QUANTIZE))
def test_every_family_compiles_a_float16_model(arch, past, mode, tmp_path):
    src, out = tiny_model_fp16(arch, with_past=past), tmp_path / "out.onnx"
    report = compile_model(src, out, passes=[*STRUCTURAL, *QUANTIZE[mode]], calib=[_calibration(tmp_path)],
                           progress=False, threads=1)

    assert report.precision == FLOAT16.to_dict()
    by_name = {p.name: p for p in report.passes}
    for p in report.passes:  # the pipeline re-measured each stage within its reported error + float16 rounding
        if p.modified:
            assert p.measured_error is not None
            assert p.measured_error <= p.error * 1.02 + FLOAT16.rounding_slack, p.name
    for name in ("prune_heads", "prune_ffn", "lowrank", "share_weights", "distill", "attention", "quantize"):
        assert by_name[name].modified, name
    assert by_name["distill"].changes["tensors_trained"] > 0
    quantize = by_name["quantize"]
    if mode == "weight_only":  # MatMulNBits takes float16 activations: no casts
        assert quantize.changes["matmuls_int4"] > 0 and "matmuls_cast_to_float32" not in quantize.changes
    else:  # the int8 kernels take float32: every quantized MatMul is cast around, and says so
        assert quantize.changes["matmuls_cast_to_float32"] == quantize.changes["matmuls_quantized"] > 0
        assert "float32_islands" in quantize.details
    # weights not quantized (norms' and biases' vectors aside: the embeddings, the LM head) stay float16
    assert _float_initializer_types(out) == {onnx.TensorProto.FLOAT16}

    session, model = make_session(out, threads=1), load_model(out)
    ids = np.random.default_rng(3).integers(5, VOCAB, size=(1, 7), dtype=np.int64)
    outputs = run_batches(session, [make_feeds(model, ids, np.ones_like(ids))])[0]
    assert all(v.dtype == np.float16 for v in outputs.values())
    assert all(np.isfinite(v).all() for v in outputs.values())
    if past:
        assert len(greedy_tokens(session, model, ids, 8, use_cache=True)) == 8


@pytest.mark.parametrize(("arch", "past"), CASES, ids=[a for a, _ in CASES])
def test_structural_passes_keep_every_weight_float16(arch, past, tmp_path):
    src, out = tiny_model_fp16(arch, with_past=past), tmp_path / "out.onnx"
    compile_model(src, out, passes=STRUCTURAL, calib=[_calibration(tmp_path)], progress=False, threads=1)
    floats = [t for t in onnx.load(out).graph.initializer
              if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert floats and all(t.data_type == onnx.TensorProto.FLOAT16 for t in floats)
    assert out.stat().st_size < src.stat().st_size


@pytest.mark.parametrize(("arch", "past"), CASES, ids=[a for a, _ in CASES])
def test_lossless_on_float16_is_held_to_float16_rounding(arch, past, tmp_path):
    report = compile_model(tiny_model_fp16(arch, with_past=past), tmp_path / "out.onnx", recipe="lossless",
                           progress=False, threads=1)
    attention = {p.name: p for p in report.passes}["attention"]
    assert attention.changes["attention_fused"] == 2
    assert attention.measured_error <= FLOAT16.lossless_tolerance
    assert "float16 model" in report.format_table()


def test_float32_tolerance_still_catches_an_inexact_rewrite_of_a_float32_model(tmp_path):
    report = compile_model(tiny_model("bert"), tmp_path / "out.onnx", recipe="lossless", progress=False, threads=1)
    assert report.precision["name"] == "float32"
    assert report.precision["lossless_tolerance"] == 1e-5
    assert "float16 model" not in report.format_table()


def test_float16_export_agrees_with_float32_to_half_precision_rounding(tmp_path):
    fp32, fp16 = load_model(tiny_model("llama", with_past=True)), load_model(tiny_model_fp16("llama", with_past=True))
    assert {v.dtype for v in fp16.graph.inputs if v.name.startswith("past")} == {ir.DataType.FLOAT16}
    ids = np.random.default_rng(1).integers(5, VOCAB, size=(2, 12), dtype=np.int64)
    ref = run_batches(make_session(fp32), [make_feeds(fp32, ids, np.ones_like(ids))])[0]["logits"]
    half = run_batches(make_session(fp16), [make_feeds(fp16, ids, np.ones_like(ids))])[0]["logits"]
    assert half.dtype == np.float16
    assert np.linalg.norm(half.astype(np.float32) - ref) <= 5e-3 * np.linalg.norm(ref)


def test_a_bfloat16_model_is_refused_in_one_line(tmp_path):
    model = load_model(tiny_model("bert"))
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor.dtype == ir.DataType.FLOAT:
            value.const_value = ir.tensor(tensor.numpy().astype(ml_dtypes.bfloat16), name=value.name)
    src = save_model(model, tmp_path / "bf16.onnx")
    with pytest.raises(OnnxpressError, match="bfloat16") as err:
        compile_model(src, tmp_path / "out.onnx", recipe="lossless", progress=False)
    assert "\n" not in str(err.value) and "float16 or float32" in str(err.value)
    assert not (tmp_path / "out.onnx").exists()
