"""The quantize pass on tiny random-weight exports: loads, fuses into ORT integer kernels, and
reports the error the saved model really has."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxpress.activations import capture_grams
from onnxpress.calibration import BATCH_SIZE, make_feeds
from onnxpress.compile import compile_model
from onnxpress.errors import OnnxpressError
from onnxpress.fidelity import compare_outputs, next_token_nll, primary_outputs
from onnxpress.model_io import load_model, save_model
from onnxpress.pass_infra import build_pass
from onnxpress.passes.quantize.capture import SequentialHessians
from onnxpress.passes.quantize.fusion import fusion_report
from onnxpress.passes.quantize.graph import apply_smoothing, find_linears
from onnxpress.passes.quantize.smooth import smooth_scales
from onnxpress.pipeline import CompileContext, Pipeline
from onnxpress.runtime import make_session, run_batches
from tests.tiny_models import tiny_model, tiny_model_tied


class _Calib:
    """Variable-length, right-padded batches (what CalibrationSet.from_texts produces)."""

    def __init__(self, model: ir.Model, n: int = 6, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.batches = []
        for i in range(n):
            lengths = rng.integers(6, 24, size=4)
            seq = int(lengths.max())
            ids = rng.integers(5, 1000, (4, seq)).astype(np.int64)
            mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
            self.batches.append(make_feeds(model, ids * mask, mask, seed=i))

    def __len__(self):
        return len(self.batches)


def _context(model: ir.Model) -> CompileContext:
    calib = _Calib(model)
    verification = _Calib(model, n=2, seed=1).batches
    ctx = CompileContext(verification=verification, calibration=calib, threads=1)
    ctx.output_names = primary_outputs(model)
    ctx.reference = ctx.run(model)
    return ctx


def _run_pass(arch: str, settings: dict, tmp_path, **tiny):
    src = tiny_model(arch, **tiny)
    model = load_model(src)
    ctx = _context(model)
    original = ctx.reference
    result = build_pass("quantize", settings).run(model, ctx)
    out = save_model(model, tmp_path / "q.onnx")
    saved = run_batches(make_session(out, threads=1), ctx.verification, ctx.output_names)
    return result, out, compare_outputs(original, saved).rel_l2


@pytest.mark.parametrize(
    "arch,settings,kernel",
    [
        ("bert", {"mode": "static"}, "MatMulIntegerToFloat"),
        ("bert", {"mode": "static", "static_format": "qdq"}, "MatMulIntegerToFloat"),
        ("bert", {"mode": "static", "activation_type": "int8", "calibration_method": "percentile"}, None),
        ("bert", {"mode": "dynamic", "gptq": False, "smooth": False}, "DynamicQuantizeMatMul"),
        ("llama", {"mode": "dynamic"}, None),
        ("llama", {"mode": "static", "calibration_method": "entropy"}, "MatMulIntegerToFloat"),
        ("llama", {"mode": "weight_only", "bits": 4, "block_size": 32}, "MatMulNBits"),
        ("llama", {"mode": "weight_only", "bits": 4, "accuracy_level": 4}, "MatMulNBits"),
        ("llama", {"mode": "weight_only", "bits": 4, "sequential": False}, "MatMulNBits"),
        ("gpt2", {"mode": "weight_only", "bits": 8, "block_size": 16, "gptq": False}, None),
    ],
)
def test_quantized_model_loads_fuses_and_reports_its_error(arch, settings, kernel, tmp_path):
    result, out, measured = _run_pass(arch, settings, tmp_path)
    assert result.modified and result.changes["matmuls_quantized"] > 0
    fusion = result.details["ort_fusion"]
    if settings.get("activation_type") == "int8":
        # ORT 1.31 on CPU leaves some s8 x s8 QDQ MatMuls unfused: the pass must say so
        assert fusion["unfused"] == 0 or "unfused_qdq" in result.details
    else:
        assert fusion["unfused"] == 0, fusion  # every Q/DQ pair became an integer kernel
        kernels = result.changes["matmuls_quantized"] - result.changes.get("matmuls_merged", 0)
        assert result.changes["fused_integer_kernels"] >= kernels
    if kernel:
        assert fusion["integer_kernels"].get(kernel), fusion
    assert fusion_report(load_model(out))["fused"] == fusion["fused"]  # the saved model, in a fresh ORT
    assert 0 < result.error < (0.5 if settings.get("bits") == 4 else 0.2)  # int4 on random weights is coarse
    assert measured == pytest.approx(result.error, rel=0.02, abs=1e-6)
    assert result.macs_after == result.macs_before  # integer kernels still count as the same products


@pytest.mark.parametrize("arch,mode,kernel", [("llama", "weight_only", "MatMulNBits"),
                                              ("bert", "weight_only", "MatMulNBits"),
                                              ("llama", "dynamic", "MatMulInteger")])
def test_matmuls_of_one_input_are_packed_into_one_kernel_with_the_same_outputs(arch, mode, kernel, tmp_path):
    """q/k/v and gate/up become one kernel and a Split; the codes are the same as unpacked."""
    runs = {}
    for pack in (True, False):
        result, out, _ = _run_pass(arch, {"mode": mode, "pack": pack, "check_fusion": False}, tmp_path / str(pack))
        kernels = [n for n in load_model(out).graph if n.op_type == kernel]
        assert len(kernels) == result.changes["matmuls_quantized"] - result.changes["matmuls_merged"]
        runs[pack] = result, run_batches(make_session(out, threads=1), _context(load_model(tiny_model(arch))).verification,
                                         primary_outputs(load_model(out)))
    layers = 2
    merged = {"llama": layers * (2 + 1), "bert": layers * 2}[arch]  # q/k/v: 2 merged, gate/up: 1
    assert runs[True][0].changes["matmuls_merged"] == merged and runs[False][0].changes["matmuls_merged"] == 0
    assert compare_outputs(runs[False][1], runs[True][1]).rel_l2 < 1e-6


@pytest.mark.parametrize("mode,kernel", [("weight_only", "MatMulNBits"), ("dynamic", "Mul")])
def test_packed_qkv_feeds_group_query_attention_directly(mode, kernel, tmp_path):
    """After the decoder fusions, q/k/v packed into one kernel become GroupQueryAttention's packed
    query input (no Split), and the stage agrees with its input within the error it reports."""
    out = tmp_path / "q.onnx"
    report = compile_model(tiny_model("llama", with_past=True), out, threads=1, progress=False, calib=["sotu"],
                           max_samples=48, max_length=32,
                           passes=["attention:target=onnxruntime", "fuse", f"quantize:mode={mode}"])
    attention = [n for n in load_model(out).graph if n.op_type == "GroupQueryAttention"]
    assert attention and all(n.inputs[0].producer().op_type == kernel and n.inputs[1] is None and n.inputs[2] is None
                             for n in attention)
    assert attention[0].attributes.get_int("do_rotary") == 1
    quantize = report.passes[-1]
    assert quantize.changes["matmuls_merged"] > 0
    assert quantize.measured_error == pytest.approx(quantize.error, rel=0.02, abs=1e-6)


@pytest.mark.parametrize("layers,share,expected", [(30, 1 / 6, [0, 1, 2, 3, 4, 25, 26, 27, 28, 29]),
                                                   (8, 0.125, [0, 7]), (2, 0.125, [0, 1]), (3, 0.5, [0, 1, 2])])
def test_outer_layers_are_a_share_at_each_end(layers, share, expected):
    from onnxpress.passes.quantize import _outer_layers

    linears = [SimpleNamespace(layer=i) for i in range(layers)] + [SimpleNamespace(layer=None)]
    assert sorted(_outer_layers(linears, share)) == expected


def test_sequential_gptq_takes_each_hessian_on_the_model_rewritten_so_far():
    """An input's Hessian is the Gram of its rows in the model as it is when the input is reached:
    a rewrite of a MatMul before it shows, one at or after the cut does not."""
    model = load_model(tiny_model("llama"))
    batches = _Calib(model).batches
    matmuls = [n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None]
    early, later = matmuls[0], next(n for n in matmuls[1:] if n.inputs[0] is not matmuls[0].inputs[0])
    hessians = SequentialHessians(model, batches, threads=1)
    hessians(early.inputs[0].name, early)
    before = capture_grams(model, batches, [later.inputs[0].name], threads=1).grams[later.inputs[0].name].xtx
    weight = early.inputs[1]
    weight.const_value = ir.tensor(weight.const_value.numpy() * 0.5)  # rewritten after the first cut
    after = capture_grams(model, batches, [later.inputs[0].name], threads=1).grams[later.inputs[0].name].xtx
    assert not np.allclose(before, after, rtol=1e-3)
    np.testing.assert_allclose(hessians(later.inputs[0].name, later), after, rtol=1e-4, atol=1e-4)


def test_sequential_capture_leaves_a_value_made_from_constants_to_its_reader():
    """A tied LM head reads Transpose(embedding table), made before the first layer and used after
    the last: no segment makes it (a rewritten head no longer reads it; carried, it is a second copy
    of the table), and the head's input rows still come out as the whole model makes them."""
    model = load_model(tiny_model_tied("llama"))
    batches = _Calib(model).batches
    matmuls = [n for n in model.graph if n.op_type == "MatMul"]
    head = matmuls[-1]
    transpose = head.inputs[1].producer()
    assert transpose.op_type == "Transpose" and transpose.inputs[0].const_value is not None
    model.graph.remove(transpose)
    model.graph.insert_before(next(iter(model.graph)), transpose)  # made first, as exports may order it
    hessians = SequentialHessians(model, batches, threads=1)
    hessians(matmuls[0].inputs[0].name, matmuls[0])
    want = capture_grams(model, batches, [head.inputs[0].name], threads=1).grams[head.inputs[0].name].xtx
    np.testing.assert_allclose(hessians(head.inputs[0].name, head), want, rtol=1e-4, atol=1e-4)
    stream = hessians.stream
    assert id(transpose) not in stream.done and id(head.inputs[0].producer()) in stream.done
    assert all(head.inputs[1].name not in values for values in [stream.shared, *stream.kept])


def test_sequential_gptq_rounds_differently_and_keeps_the_reported_error(tmp_path):
    runs = {}
    for sequential in (True, False):
        settings = {"mode": "weight_only", "bits": 4, "block_size": 16, "sequential": sequential, "check_fusion": False}
        result, out, measured = _run_pass("llama", settings, tmp_path / str(sequential))
        assert result.changes["matmuls_gptq"] == result.changes["matmuls_quantized"] > 0
        assert measured == pytest.approx(result.error, rel=0.02, abs=1e-6)
        runs[sequential] = [n.inputs[1].const_value.numpy() for n in load_model(out).graph if n.op_type == "MatMulNBits"]
    # the first group sees the float model either way; some later one a rounded model
    assert np.array_equal(runs[True][0], runs[False][0])
    assert any(not np.array_equal(a, b) for a, b in zip(runs[True], runs[False], strict=True))


def test_outer_roles_get_their_own_bits_and_the_model_keeps_the_reported_error(tmp_path):
    """Down projections of the outer layers (here both of the two) in int8 blocks of 64, the
    rest int4: the kernels say so and ORT agrees with the error the pass reports."""
    settings = {"mode": "weight_only", "bits": 4, "block_size": 32, "outer_roles": ["down"],
                "outer_bits": 8, "outer_block_size": 64, "lm_head_bits": 4}
    result, out, err = _run_pass("llama", settings, tmp_path)
    kernels = {n.name: (n.attributes.get_int("bits"), n.attributes.get_int("block_size"))
               for n in load_model(out).graph if n.op_type == "MatMulNBits"}
    wide = {name: v for name, v in kernels.items() if "down_proj" in name}
    assert len(wide) == 2 and set(wide.values()) == {(8, 64)}
    assert {v for name, v in kernels.items() if name not in wide} == {(4, 32)}
    assert result.changes["matmuls_int8"] == 2 and result.details["outer"]["layers"] == [0, 1]
    assert err <= result.error + 1e-6


def test_compile_pipeline_verifies_the_quantized_stage(tmp_path):
    """Through the pass manager: the checker runs and the re-measured error matches."""
    model = load_model(tiny_model("bert"))
    ctx = _context(model)
    manager = Pipeline([build_pass("quantize", {"mode": "static"})], progress=False)
    (result,) = manager.run(model, ctx)
    assert result.measured_error == pytest.approx(result.error, rel=0.02, abs=1e-6)
    assert result.changes["matmuls_smoothed"] + result.changes["matmuls_gptq"] > 0


def test_budget_keeps_sensitive_matmuls_float(tmp_path):
    model = load_model(tiny_model("bert"))
    ctx = _context(model)
    free = build_pass("quantize", {"mode": "static", "check_fusion": False}).run(
        load_model(tiny_model("bert")), _context(load_model(tiny_model("bert")))
    )
    budget = free.error / 3
    result = build_pass("quantize", {"mode": "static", "budget": budget, "sensitivity": "measured"}).run(
        model, ctx
    )
    kept = result.changes["kept_float_sensitivity"]
    assert kept > 0
    assert result.changes["matmuls_quantized"] + kept == free.changes["matmuls_quantized"]
    reasons = [m for m in result.details["matmuls"] if not m["quantized"]]
    assert all(m["reason"] == "sensitivity" for m in reasons) and len(reasons) == kept
    chosen = [
        t for t in result.details["budget_trials"] if t["quantized"] == result.changes["matmuls_quantized"]
    ]
    assert chosen[-1]["error"] <= budget or kept == free.changes["matmuls_quantized"]


def test_perplexity_budget_bounds_the_held_out_perplexity():
    """budget_metric=perplexity: the written model's next-token perplexity on the held-out
    batches rises by at most the budget, measured here independently of the pass."""
    model = load_model(tiny_model("llama"))
    ctx = _context(model)
    batches = ctx.verification  # held out from the calibration the pass fits on
    reference_nll = next_token_nll(ctx.run(model, batches, ["logits"]), batches)[0]

    def increase(m: ir.Model) -> float:
        return math.exp(next_token_nll(ctx.run(m, batches, ["logits"]), batches)[0] - reference_nll) - 1.0

    # round to nearest: on random weights GPTQ's and smoothing's gains are noise that can make
    # int8 of everything look better than float, leaving nothing for a budget to bound
    plain = {"mode": "dynamic", "gptq": False, "smooth": False}
    everything = load_model(tiny_model("llama"))
    build_pass("quantize", {**plain, "check_fusion": False}).run(everything, _context(everything))
    budget = increase(everything) / 3
    assert budget > 0
    settings = {**plain, "budget": budget, "budget_metric": "perplexity", "sensitivity": "measured"}
    result = build_pass("quantize", settings).run(model, ctx)
    assert result.changes["kept_float_sensitivity"] > 0 and result.changes["matmuls_quantized"] > 0
    assert increase(model) <= budget
    final = [t for t in result.details["budget_trials"] if t["quantized"] == result.changes["matmuls_quantized"]]
    assert final[-1]["error"] == pytest.approx(increase(model), rel=1e-6, abs=1e-9)


def test_perplexity_budget_on_an_encoder_is_a_one_line_error():
    model = load_model(tiny_model("bert"))
    settings = {"mode": "static", "budget": 0.01, "budget_metric": "perplexity"}
    with pytest.raises(OnnxpressError, match="needs a decoder with a 'logits' output") as err:
        build_pass("quantize", settings).run(model, _context(model))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_smoothing_is_exact_before_quantization(arch):
    model = load_model(tiny_model(arch))
    ctx = _context(model)
    linears, _ = find_linears(model, ctx.analysis(model))
    groups: dict[str, list] = {}
    for lin in linears:
        groups.setdefault(lin.input.name, []).append(lin)
    rng = np.random.default_rng(0)
    where = []
    for group in groups.values():
        k = group[0].weight_array().shape[0]
        s = smooth_scales(rng.uniform(0.1, 20, k).astype(np.float32), [g.weight_array() for g in group], 0.5)
        where.append(apply_smoothing(model.graph, group[0].input, group, s))
    model.graph.sort()
    assert compare_outputs(ctx.reference, ctx.run(model)).rel_l2 < 1e-5
    if arch == "llama":  # pre-norm: RMSNorm gamma and the gated FFN's up projection absorb the scales
        assert "Mul constant" in where or any(
            w in where for w in ("SimplifiedLayerNormalization", "RMSNormalization")
        )
        assert "MatMul weight" in where


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"mode": "int3"}, "'mode' must be one of"),
        ({"bits": 3}, "'bits' must be 4 or 8"),
        ({"smooth_alpha": 2}, "'smooth_alpha'"),
        ({"block_size": 48}, "'block_size'"),
        ({"lm_head_block_size": 24}, "'lm_head_block_size'"),
        ({"method_overrides": ["down:percentile"]}, "'method_overrides'"),
        ({"budget": -1}, "'budget'"),
        ({"accuracy_level": 5}, "'accuracy_level'"),
        ({"outer_roles": ["ffn"]}, "unknown role 'ffn'"),
        ({"outer_layers": 0.7}, "'outer_layers'"),
        ({"outer_block_size": 48}, "'outer_block_size'"),
        ({"nonsense": 1}, "unknown setting 'nonsense'"),
    ],
)
def test_config_errors_are_one_line(settings, message):
    with pytest.raises(OnnxpressError) as err:
        build_pass("quantize", settings)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_static_mode_without_calibration_is_a_one_line_error():
    model = load_model(tiny_model("bert"))
    ctx = CompileContext(verification=_Calib(model, 1).batches)
    with pytest.raises(OnnxpressError, match="calibration") as err:
        build_pass("quantize", {"mode": "static"}).run(model, ctx)
    assert "\n" not in str(err.value)


def test_round_to_nearest_weight_only_needs_no_calibration():
    assert not build_pass("quantize", {"mode": "weight_only", "gptq": False}).needs_calibration
    assert build_pass("quantize", {"mode": "weight_only"}).needs_calibration


def _weight_matmuls(model) -> int:
    return len(find_linears(model)[0])


def test_quantize_after_pruning_and_lowrank(tmp_path):
    """prune heads + FFN neurons, split matrices low-rank, then quantise: both factors of every
    split are quantised, ORT fuses them all, and the saved model has the reported error."""
    model = load_model(tiny_model("bert"))
    ctx = _context(model)
    passes = [
        build_pass("prune_heads", {"fraction": 0.25}),
        build_pass("prune_ffn", {"fraction": 0.25}),
        build_pass("lowrank", {"fraction": 0.2}),
        build_pass("quantize", {"mode": "static"}),
    ]
    before = _weight_matmuls(model)
    heads, ffn, lowrank, quant = Pipeline(passes, progress=False).run(model, ctx)
    assert heads.changes["heads_removed"] > 0 and ffn.changes["neurons_removed"] > 0
    split = lowrank.changes["matrices_split"]
    assert split > 0
    # every split turns one weight MatMul into two, and the quantiser takes them all
    assert quant.changes["matmuls_quantized"] == before + split
    assert not quant.details["kept_float"]
    fusion = quant.details["ort_fusion"]
    assert fusion["unfused"] == 0 and fusion["fused"] >= before + split, fusion
    assert 0 < quant.error < 0.2
    assert quant.measured_error == pytest.approx(quant.error, rel=0.02, abs=1e-6)
    out = save_model(model, tmp_path / "composed.onnx")
    assert fusion_report(load_model(out))["fused"] == fusion["fused"]


def test_quantize_after_attention_on_the_onnxpress_op(tmp_path):
    """A model that already uses onnxpress.Attention: the fusion check and the verification
    sessions register the ops library, and the saved model keeps the reported error."""
    from onnxpress import runtime_ops

    if runtime_ops.find_built() is None:
        pytest.skip("onnxpress op library not built: run `python -m onnxpress.runtime_ops build`")
    model = load_model(tiny_model("bert"))
    ctx = _context(model)
    original = ctx.reference  # the manager moves ctx.reference to each accepted stage
    passes = [build_pass("attention", {"target": "onnxpress"}), build_pass("quantize", {"mode": "static"})]
    attention, quant = Pipeline(passes, progress=False).run(model, ctx)
    assert attention.changes["attention_fused"] == 2
    fusion = quant.details["ort_fusion"]
    assert fusion["unfused"] == 0 and fusion["fused"] == quant.changes["matmuls_quantized"] > 0, fusion
    out = save_model(model, tmp_path / "q.onnx")
    saved = run_batches(make_session(out, threads=1), ctx.verification, ctx.output_names)
    assert compare_outputs(original, saved).rel_l2 == pytest.approx(quant.measured_error, rel=0.02, abs=1e-5)


def _linear_with_bias(k: int = 32, n: int = 16, seed: int = 0) -> ir.Model:
    """y = x W + b: one MatMul with a bias, for checking what static quantization does to its mean."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])],
        [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")],
    )
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.mark.parametrize("correct", [True, False])
def test_bias_correction_removes_the_mean_error_clipped_ranges_add(correct):
    """Heavy-tailed inputs whose range is clipped (percentile) shift the int8 output's mean;
    bias correction subtracts that shift from the bias, measured in ORT on the calibration rows."""
    rng = np.random.default_rng(1)
    batches = [{"x": rng.exponential(1.0, (64, 32)).astype(np.float32)} for _ in range(8)]
    model = _linear_with_bias()
    ctx = CompileContext(verification=batches[:2], calibration=SimpleNamespace(batches=batches), threads=1)
    ctx.output_names = ["y"]
    ctx.reference, reference = ctx.run(model), ctx.run(model, batches)
    settings = {"mode": "static", "calibration_method": "percentile", "percentile": 99.0, "smooth": False,
                "gptq": False, "bias_correction": correct, "calibration_batches": 8 * 64 // BATCH_SIZE}
    result = build_pass("quantize", settings).run(model, ctx)
    quantized = ctx.run(model, batches)
    mean_error = np.mean([q["y"] - r["y"] for q, r in zip(quantized, reference, strict=True)], axis=(0, 1))
    assert result.changes.get("biases_corrected", 0) == (1 if correct else 0)
    scale = np.abs(np.concatenate([r["y"] for r in reference])).mean()
    if correct:
        assert np.abs(mean_error).max() < 0.002 * scale
    else:  # what there is to correct: the clipped tail pulls every output channel's mean
        assert np.abs(mean_error).max() > 0.01 * scale


def test_accuracy_level_is_written_to_every_matmul_nbits(tmp_path):
    result, out, _ = _run_pass("llama", {"mode": "weight_only", "bits": 4, "accuracy_level": 4}, tmp_path)
    levels = {n.attributes.get_int("accuracy_level") for n in load_model(out).graph if n.op_type == "MatMulNBits"}
    assert levels == {4} and result.details["accuracy_level"] == 4


@pytest.mark.parametrize("settings,scored_with", [
    ({"mode": "static"}, "minmax"),  # the default keeps encoders' rare outlier activations in range
    ({"mode": "static", "calibration_method": "percentile"}, "percentile"),
    ({"mode": "static", "calibration_method": "auto"}, "minmax"),
    ({"mode": "dynamic"}, "minmax"),  # ORT quantises each row between its own min and max
])
def test_smoothing_strength_is_scored_with_the_range_the_input_will_get(settings, scored_with, tmp_path, monkeypatch):
    import onnxpress.passes.quantize as quantize

    methods = []
    real = quantize.choose_alpha
    monkeypatch.setattr(quantize, "choose_alpha", lambda *a: methods.append(a[4]) or real(*a))
    result, _, _ = _run_pass("bert", settings, tmp_path)
    assert result.changes["matmuls_smoothed"] > 0
    assert set(methods) == {scored_with}


@pytest.mark.parametrize("lm_head_bits,symmetric,lm_head_block,float16_scales",
                         [(0, False, 0, False), (8, False, 64, False), (8, True, 0, False), (-1, False, 0, False),
                          (8, False, 64, True)])
def test_weight_only_quantizes_an_lm_head_tied_to_the_embedding_table(tmp_path, lm_head_bits, symmetric,
                                                                       lm_head_block, float16_scales):
    model = load_model(tiny_model_tied("llama"))
    ctx = _context(model)
    settings = {"mode": "weight_only", "bits": 4, "lm_head_bits": lm_head_bits, "symmetric": symmetric,
                "lm_head_block_size": lm_head_block, "min_embedding_size": 1000, "float16_scales": float16_scales}
    result = build_pass("quantize", settings).run(model, ctx)
    out = save_model(model, tmp_path / "q.onnx")
    saved = load_model(out)
    heads = [n for n in saved.graph if n.op_type == "MatMulNBits" and n.attributes.get_int("N") == 1000]
    transposes = [n for n in saved.graph if n.op_type == "Transpose" and n.name == "tied_lm_head_Transpose"]
    if lm_head_bits < 0:
        assert not heads and transposes and result.changes["lm_head_from_tied_table"] == 0
        assert result.changes["embeddings_int8"] == 0  # the float head still reads the table
    else:
        assert [n.attributes.get_int("bits") for n in heads] == [lm_head_bits or 4]
        assert [n.attributes.get_int("block_size") for n in heads] == [lm_head_block or 32]
        assert not transposes and result.changes["lm_head_from_tied_table"] == 1
        # the Gather reads the head's codes: the table is stored once, quantised
        assert result.changes["embeddings_from_lm_head_codes"] == 1 and result.changes["embeddings_int8"] == 0
        assert [n.op_type for n in saved.graph].count("GatherBlockQuantized") == 1
        assert "model.embed_tokens.weight" not in saved.graph.initializers
        scales = [saved.graph.initializers[n.inputs[2].name] if n.inputs[2].is_initializer()
                  else saved.graph.initializers[n.inputs[2].producer().inputs[0].name] for n in heads]
        assert [s.dtype for s in scales] == [ir.DataType.FLOAT16 if float16_scales else ir.DataType.FLOAT]
    ran = run_batches(make_session(out, threads=1), ctx.verification, ctx.output_names)
    assert compare_outputs(ctx.reference, ran).rel_l2 <= result.error + 1e-6


@pytest.mark.parametrize("tied", [True, False])
def test_an_lm_head_split_by_rows_computes_its_first_rows_in_int8(tmp_path, tied):
    model = load_model(tiny_model_tied("llama") if tied else tiny_model("llama"))
    table = model.graph.initializers["model.embed_tokens.weight"].const_value.numpy()
    ctx = _context(model)
    settings = {"mode": "weight_only", "bits": 4, "lm_head_bits": 4, "lm_head_block_size": 16,
                "lm_head_int8_rows": 96, "min_embedding_size": 1000, "float16_scales": True}
    result = build_pass("quantize", settings).run(model, ctx)
    out = save_model(model, tmp_path / "q.onnx")
    saved = load_model(out)
    kernels = {n.attributes.get_int("N"): n for n in saved.graph if n.op_type == "MatMulNBits"
               and n.attributes.get_int("N") in (96, 904)}
    assert {n: (k.attributes.get_int("bits"), k.attributes.get_int("block_size")) for n, k in kernels.items()} == {
        96: (8, 64), 904: (4, 16)}
    concat = [n for n, _ in kernels[96].outputs[0].uses()]
    assert [n.op_type for n in concat] == ["Concat"] and list(concat[0].inputs) == [
        kernels[96].outputs[0], kernels[904].outputs[0]]
    assert result.changes["lm_head_int8_rows"] == 96
    assert result.details["lm_head_int8_rows_token_share"] == pytest.approx(91 / 995, abs=0.05)
    if tied:  # the embedding reads each row from its range's codes: int8 up to row 96, 4-bit after
        assert result.changes["embeddings_from_lm_head_codes"] == 1
        lookups = [n for n in saved.graph if n.op_type == "GatherBlockQuantized"]
        assert sorted(n.attributes.get_int("bits") for n in lookups) == [4, 8]
        assert "model.embed_tokens.weight" not in saved.graph.initializers  # the table is stored once
        embedded = next(n for n in saved.graph if n.op_type == "Where").outputs[0].name
        proto = onnx.load(out)
        proto.graph.output.append(onnx.helper.make_tensor_value_info(embedded, onnx.TensorProto.FLOAT, None))
        ids = np.random.default_rng(0).permutation(1000)[None, :]  # every row, in no order
        feeds = make_feeds(saved, ids, np.ones((1, 1000), np.int64))
        rows = make_session(proto.SerializeToString(), threads=1).run([embedded], feeds)[0][0]
        error = np.abs(rows - table[ids[0]]).max(axis=1) / np.abs(table[ids[0]]).max(axis=1)
        first = ids[0] < 96
        assert error[first].max() < 0.01 and 0.01 < error[~first].max() < 0.2
    ran = run_batches(make_session(out, threads=1), ctx.verification, ctx.output_names)
    assert compare_outputs(ctx.reference, ran).rel_l2 <= result.error + 1e-6


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_int8_quantizes_an_lm_head_tied_to_the_embedding_table_and_stores_the_table_int8(tmp_path, mode):
    model = load_model(tiny_model_tied("llama"))
    ctx = _context(model)
    result = build_pass("quantize", {"mode": mode, "min_embedding_size": 1000}).run(model, ctx)
    out = save_model(model, tmp_path / "q.onnx")
    saved = load_model(out)
    assert result.changes["lm_head_from_tied_table"] == 1
    assert result.changes["embeddings_int8"] == 1  # the table serves the Gather alone now
    assert not [n for n in saved.graph if n.op_type == "Transpose" and n.name == "tied_lm_head_Transpose"]
    head_weights = [v for v in saved.graph.initializers.values() if v.const_value.shape == (64, 1000)]
    assert [v.const_value.dtype for v in head_weights] == [ir.DataType.INT8]  # the head's own int8 copy
    ran = run_batches(make_session(out, threads=1), ctx.verification, ctx.output_names)
    assert compare_outputs(ctx.reference, ran).rel_l2 <= result.error + 1e-6


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_an_embedding_table_stored_int8_a_few_rows_at_a_time_equals_the_whole_table_rounded(monkeypatch, dtype):
    import onnxpress.passes.quantize.graph as quant_graph

    rng = np.random.default_rng(0)
    table = (rng.standard_normal((1000, 16)) * rng.uniform(0.01, 3.0, (1000, 1))).astype(dtype)
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([4]))
    weight = ir.Value(name="table", const_value=ir.tensor(table, name="table"))
    gather = ir.node("Gather", [weight, ids], name="embed")
    graph = ir.Graph([ids], gather.outputs, nodes=[gather], initializers=[weight], opset_imports={"": 21})
    monkeypatch.setattr(quant_graph, "EMBEDDING_ROWS_AT_A_TIME", 300)
    assert quant_graph.QuantRewriter(ir.Model(graph, ir_version=10)).embedding(gather)

    scale = (np.maximum(np.abs(table.astype(np.float32)).max(axis=1, keepdims=True), 1e-12) / 127)
    scale = scale.astype(dtype).astype(np.float32)
    stored = {name.rsplit("_", 2)[-2] + "_" + name.rsplit("_", 1)[-1]: v.const_value.numpy()
              for name, v in graph.initializers.items() if name != "table"}
    np.testing.assert_array_equal(stored["table_int8"], np.clip(np.round(table / scale), -127, 127).astype(np.int8))
    np.testing.assert_array_equal(stored["row_scales"], scale.astype(dtype))
