"""The pass manager's promise: every stage is re-measured, and a stage that breaks it is refused.

Test-only passes stand in for buggy ones (they rewrite a small MLP); each refusal must be
one line naming the pass, through ``compile_model`` and through the command line, with no
model and no report left behind. The end-to-end fidelity each stage reports against the
input model is checked against a direct computation.
"""

import json

import numpy as np
import onnx_ir as ir
import pytest
from test_memory import fresh_pages

import onnxpress.pipeline
from onnxpress import model_io
from onnxpress.calibration import CalibrationSet
from onnxpress.cli import main
from onnxpress.compile import VERIFY_FRACTION, compile_model, measured_part, report_path
from onnxpress.datasets import EVALUATION_MIN_CHARS, sotu_files, split_sentences
from onnxpress.errors import OnnxpressError
from onnxpress.fidelity import FidelityMeter
from onnxpress.model_io import load_model
from onnxpress.pass_infra import Outcome, Pass, register_pass
from onnxpress.pipeline import CompileContext, Pipeline, VerificationError
from onnxpress.runtime import make_session, run_batches

from graphs import mlp_model, save
from tiny_models import tiny_model


def _set_w2(model: ir.Model, change) -> None:
    """Replace the MLP's second weight by ``change(w2)``."""
    value = model.graph.initializers["w2"]
    value.const_value = ir.tensor(change(value.const_value.numpy()).astype(np.float32), name="w2")


def _noise(scale: float):
    return lambda w: w + scale * np.abs(w).mean() * np.random.default_rng(0).standard_normal(w.shape)


@register_pass
class UnderReportingPass(Pass):
    """Moves the outputs by about 5% and reports a tenth of that."""

    name = "test_under_reports"

    def apply(self, model, ctx):
        _set_w2(model, _noise(0.05))
        return Outcome(changes={"weights_changed": 1})

    def run(self, model, ctx):
        result = super().run(model, ctx)
        result.error /= 10
        return result


@register_pass
class UnsortedGraphPass(Pass):
    """Moves a node after its consumers: ONNX Runtime sorts and runs it, the ONNX checker refuses it."""

    name = "test_unsorted_graph"

    def apply(self, model, ctx):
        node = model.graph[1]  # MatMul x w1, read by the Add after it
        model.graph.remove(node)
        model.graph.append(node)
        return Outcome(changes={"nodes_moved": 1})


@register_pass
class WrongInputTypePass(Pass):
    """Feeds an int64 tensor to a float Add: ONNX Runtime cannot load the model."""

    name = "test_wrong_input_type"

    def apply(self, model, ctx):
        add = next(n for n in model.graph if n.op_type == "Add")
        cast = ir.node("Cast", [add.inputs[1]], attributes={"to": ir.DataType.INT64}, name="bad_cast")
        model.graph.insert_before(add, cast)
        add.replace_input_with(1, cast.outputs[0])
        return Outcome(changes={"casts_added": 1})


@register_pass
class RuntimeFailurePass(Pass):
    """Reshapes [batch, 8] to rows of 7: loads, then fails when run on any batch but a multiple of 7."""

    name = "test_runtime_failure"

    def apply(self, model, ctx):
        div = next(n for n in model.graph if n.op_type == "Div")
        sevens = ir.Value(name="sevens", const_value=ir.tensor(np.array([-1, 7], np.int64), name="sevens"))
        eights = ir.Value(name="eights", const_value=ir.tensor(np.array([-1, 8], np.int64), name="eights"))
        for value in (sevens, eights):
            model.graph.register_initializer(value)
        first = ir.node("Reshape", [div.inputs[0], sevens], name="to_sevens")
        back = ir.node("Reshape", [first.outputs[0], eights], name="to_eights")
        model.graph.insert_before(div, [first, back])
        div.replace_input_with(0, back.outputs[0])
        return Outcome(changes={"reshapes_added": 2})


@register_pass
class AlmostLosslessPass(Pass):
    """Declares itself lossless but moves the outputs by 1e-4 (and reports it honestly)."""

    name = "test_almost_lossless"
    lossless = True

    def apply(self, model, ctx):
        _set_w2(model, lambda w: w * (1 + 1e-4))
        return Outcome(changes={"weights_scaled": 1})


@register_pass
class HonestLossyPass(Pass):
    """Moves the outputs by about 5% and reports it: accepted."""

    name = "test_honest_lossy"

    def apply(self, model, ctx):
        _set_w2(model, _noise(0.05))
        return Outcome(changes={"weights_changed": 1})


@register_pass
class AllocatingPass(Pass):
    """Holds 400 MB for a moment and changes nothing: its peak memory shows it, the next pass's does not."""

    name = "test_allocates"

    def apply(self, model, ctx):
        with fresh_pages(400):
            return Outcome()


# pass -> what its one-line refusal must say (besides the pass's name)
REFUSALS = {
    "test_under_reports": "reported an error of",
    "test_unsorted_graph": "invalid ONNX model (Nodes in a graph must be topologically sorted",
    "test_wrong_input_type": "ONNX Runtime cannot load (",
    "test_runtime_failure": "ONNX Runtime cannot run (",
    "test_almost_lossless": "is lossless, but the saved model is 0.0001 (relative L2)",
}
# the first line of ONNX Runtime's own message, quoted in the refusal
ORT_WORDS = {"test_wrong_input_type": "Type Error", "test_runtime_failure": "Reshape"}


@pytest.fixture
def mlp(tmp_path):
    return save(mlp_model(), tmp_path / "mlp.onnx")


def assert_nothing_written(out_dir):
    assert sorted(p.name for p in out_dir.iterdir()) == [], "a refused compile must leave nothing behind"


@pytest.mark.parametrize("bad", sorted(REFUSALS))
def test_refused_through_compile_model(tmp_path, mlp, bad):
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "o.onnx"
    with pytest.raises(VerificationError) as info:
        compile_model(mlp, out, passes=["cleanup", bad], progress=False)
    message = str(info.value)
    assert message.startswith(f"pass {bad} ") and "\n" not in message, message
    assert REFUSALS[bad] in message and ORT_WORDS.get(bad, "") in message, message
    assert message.endswith("please report this bug; run without this pass meanwhile")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("bad", sorted(REFUSALS))
def test_refused_through_the_command_line(capfd, tmp_path, mlp, bad):
    (tmp_path / "out").mkdir()
    code = main(["compile", str(mlp), "-o", str(tmp_path / "out" / "o.onnx"), "--passes", "cleanup", bad])
    err = capfd.readouterr().err  # file-descriptor level: ONNX Runtime's own log lines would show here
    assert code == 2
    assert err.startswith(f"onnxpress: error: pass {bad} ") and err.count("\n") == 1, err
    assert REFUSALS[bad] in err and "Traceback" not in err
    assert_nothing_written(tmp_path / "out")


def test_an_honest_lossy_pass_is_accepted_and_measured_against_the_input(tmp_path, mlp):
    out = tmp_path / "o.onnx"
    report = compile_model(mlp, out, passes=["cleanup", "test_honest_lossy"], progress=False)
    cleanup, lossy = report.passes
    assert 0.01 < lossy.error and lossy.measured_error == pytest.approx(lossy.error, rel=0.02, abs=1e-6)
    # no attention mask: the row cosine of the outputs, on the same synthetic batches
    batches = CalibrationSet.synthetic(load_model(mlp), seed=0, model_dir=tmp_path).batches
    meter = FidelityMeter.of_model(load_model(mlp), batches)
    direct = meter.measure(run_batches(make_session(out), batches, meter.outputs))
    assert lossy.vs_input["metric"] == "output cosine"
    assert lossy.vs_input["cosine_mean"] == pytest.approx(direct.cosine_mean, abs=1e-6)
    assert lossy.vs_input["cosine_mean"] < 0.9999
    assert cleanup.vs_input["cosine_min"] == pytest.approx(1.0, abs=1e-6)  # cleanup is exact
    assert report.fidelity == lossy.vs_input
    saved = json.loads(report_path(out).read_text())
    assert saved["fidelity"] == lossy.vs_input and saved["passes"][1]["vs_previous"]["rel_l2"] == lossy.error


def test_each_pass_reports_its_own_peak_memory(tmp_path, mlp):
    report = compile_model(mlp, tmp_path / "o.onnx", passes=["cleanup", "test_allocates", "cleanup"],
                           progress=False)
    first, allocating, last = (p.peak_rss_mb for p in report.passes)
    assert allocating > max(first, last) + 350
    assert json.loads(report_path(tmp_path / "o.onnx").read_text())["passes"][1]["peak_rss_mb"] == allocating


def test_a_pass_that_would_not_fit_in_free_memory_is_warned_about_first(tmp_path, mlp, monkeypatch, capsys):
    import onnxpress.memory

    class Machine:  # what psutil.virtual_memory() returns, with little available
        available = 0

    monkeypatch.setattr(onnxpress.memory.psutil, "virtual_memory", lambda: Machine)
    report = compile_model(mlp, tmp_path / "o.onnx", passes=["cleanup", "test_honest_lossy"], progress=False)
    err = capsys.readouterr().err
    assert err.count("onnxpress: warning: pass") == 2 and "cleanup may need about" in err
    assert "is available: it may be killed for memory" in report.passes[1].details["memory_warning"]
    monkeypatch.setattr(onnxpress.memory.psutil, "virtual_memory", lambda: type("Plenty", (), {"available": 2**40}))
    report = compile_model(mlp, tmp_path / "p.onnx", passes=["cleanup"], progress=False)
    assert "warning" not in capsys.readouterr().err and "memory_warning" not in report.passes[0].details


def test_weights_mapped_from_a_data_file_count_only_for_what_a_pass_makes_of_them(tmp_path, monkeypatch, capsys):
    """Sessions read an external data file's weights from the file: a pass that only rewires the
    graph needs no memory for them, one that rewrites weights needs room for the new ones."""
    import onnxpress.memory

    src = save(mlp_model(), tmp_path / "ext.onnx", external=True)
    mapped = model_io.mapped_nbytes(load_model(src))
    assert mapped == model_io.model_nbytes(load_model(src)) > 0

    class Machine:  # room for less than the weights
        available = mapped // 2

    monkeypatch.setattr(onnxpress.memory.psutil, "virtual_memory", lambda: Machine)
    report = compile_model(src, tmp_path / "o.onnx", passes=["cleanup", "test_honest_lossy"], progress=False)
    err = capsys.readouterr().err
    assert "cleanup" not in err and "memory_warning" not in report.passes[0].details
    assert "pass test_honest_lossy may need" in err and "mapped from its data file" in err
    assert "memory_warning" in report.passes[1].details


def test_each_stage_is_run_once_by_the_pass_and_once_by_the_manager(tmp_path, mlp, monkeypatch):
    """The end-to-end fidelity comes from the outputs verification already has: no extra runs."""
    sessions = []
    real = onnxpress.pipeline.make_session
    monkeypatch.setattr(onnxpress.pipeline, "make_session", lambda *a, **k: sessions.append(1) or real(*a, **k))
    report = compile_model(mlp, tmp_path / "o.onnx", passes=["cleanup", "test_honest_lossy", "cleanup"],
                           progress=False)
    modified = sum(p.modified for p in report.passes)
    assert modified == 2  # the second cleanup finds nothing and carries the stage before it
    assert len(sessions) == 1 + 2 * modified  # the input's reference run, then measure + verify per stage
    assert report.passes[2].vs_input == report.passes[1].vs_input


def test_without_verification_each_stage_is_still_measured_against_the_previous_one(tmp_path, mlp):
    passes = ["test_honest_lossy", "test_almost_lossless"]
    checked = compile_model(mlp, tmp_path / "a.onnx", passes=passes[:1], progress=False)
    unchecked = compile_model(mlp, tmp_path / "b.onnx", passes=passes, verify=False, progress=False)
    assert all(p.measured_error is None for p in unchecked.passes)
    assert unchecked.passes[0].vs_input == checked.passes[0].vs_input
    # the second pass is compared with the first one's model, not with the input
    assert unchecked.passes[1].error == pytest.approx(1e-4, rel=0.05)
    assert "no " in unchecked.format_table().splitlines()[-1]


def test_a_pass_that_fails_for_a_user_reason_is_not_called_a_bug(tmp_path, mlp):
    with pytest.raises(OnnxpressError, match="need calibration data") as info:
        compile_model(mlp, tmp_path / "o.onnx", passes=["cleanup", "lowrank"], progress=False)
    assert not isinstance(info.value, VerificationError)


def test_compile_analyses_the_input_model_once(tmp_path, monkeypatch):
    import onnxpress.analysis

    analysed = []
    real = onnxpress.analysis.analyze
    monkeypatch.setattr(onnxpress.analysis, "analyze", lambda model: analysed.append(id(model)) or real(model))
    src = tiny_model("bert")
    compile_model(src, tmp_path / "o.onnx", passes=["attention"], progress=False)  # check_applicable
    assert len(analysed) == 1
    # select_passes (optional attention) and check_applicable (the attention pass needs it) share one
    # map of the input model; the attention pass needs another, of the model as cleanup rewrote it
    compile_model(src, tmp_path / "o.onnx", recipe="lossless", progress=False)
    assert len(analysed) == 3


def _held_out(src):
    """What compile_model measures on with CALIB below, rebuilt the same way (for an encoder, the
    sentences of the held-out samples), and the held-out samples themselves."""
    model = load_model(src)
    calib = CalibrationSet.from_files(sotu_files("calibration"), src.parent, model, max_length=32,
                                      batch_size=8, max_samples=48, seed=0)
    held_out = calib.split(VERIFY_FRACTION)[1]
    return measured_part(held_out, model, src.parent, max_length=32, batch_size=8, seed=0), held_out


CALIB = dict(calib=["sotu"], max_samples=48, max_length=32, threads=1, progress=False)


@pytest.mark.parametrize("arch, metric", [("bert", "embedding cosine"), ("llama", "perplexity")])
def test_report_fidelity_is_the_models_own_measure_on_the_held_out_samples(tmp_path, arch, metric):
    src = tiny_model(arch, with_past=arch == "llama")
    out = tmp_path / "o.onnx"
    report = compile_model(src, out, recipe="balanced", **CALIB)
    measured, held_out = _held_out(src)
    meter = FidelityMeter.of_model(load_model(src), measured.batches, threads=1)
    direct = meter.measure(run_batches(make_session(out, threads=1), measured.batches, meter.outputs))
    fid = report.fidelity
    assert fid["metric"] == metric and fid["samples"] == meter.samples == measured.num_samples
    assert held_out.num_samples == 7
    if metric == "perplexity":  # a decoder: the window-filling samples themselves
        assert measured is held_out and report.verified_on == "7 held-out calibration samples"
    else:  # an encoder: the sentences of those samples, what a sentence embedding embeds
        whole = [s for text in held_out.texts for s in split_sentences(text, EVALUATION_MIN_CHARS)]
        assert sorted(measured.texts) == sorted(whole)
        assert report.verified_on == f"{measured.num_samples} sentences of 7 held-out calibration samples"
    assert fid["loss"] == pytest.approx(direct.loss, rel=1e-3, abs=1e-7) and fid["loss"] != 0  # int8 moved it
    table = report.format_table()
    assert "rel L2" not in table and "vs input" in table
    if metric == "perplexity":
        assert fid["perplexity_change"] == fid["loss"]
        assert f"perplexity {100 * fid['perplexity_change']:+.2f}%" in table
    else:
        assert fid["cosine_mean"] == pytest.approx(1 - fid["loss"])
        assert f"embedding cosine {fid['cosine_mean']:.4f} mean / {fid['cosine_min']:.4f} min" in table
    # exact stages report the input's own measure
    assert report.passes[0].vs_input["loss"] == pytest.approx(0.0, abs=1e-6)


def test_check_applicable_uses_the_contexts_analysis(mlp):
    model = load_model(mlp)
    ctx = CompileContext(verification=[])
    pipeline = Pipeline([UnderReportingPass()], progress=False)
    pipeline.check_applicable(model, ctx)  # no pass needs attention: nothing analysed
    assert ctx._analysis is None


def test_named_data_is_also_measured_on_the_corpus_it_never_drew_from(tmp_path):
    from onnxpress.compile import unseen_domain_batches

    src = tiny_model("bert")
    report = compile_model(src, tmp_path / "o.onnx", passes=["cleanup", "prune_ffn:fraction=0.5"], **CALIB)
    assert "SOTU calibration split" in report.calibration and "BBC News calibration split" in report.unseen_on
    unseen = unseen_domain_batches("sotu", load_model(src), src.parent, 7, max_length=32, batch_size=8, seed=0)
    meter = FidelityMeter.of_model(load_model(src), unseen.batches, threads=1)
    direct = meter.measure(run_batches(make_session(tmp_path / "o.onnx", threads=1), unseen.batches, meter.outputs))
    assert report.fidelity_unseen["loss"] == pytest.approx(direct.loss, rel=1e-3, abs=1e-7)
    assert report.fidelity_unseen["loss"] != pytest.approx(report.fidelity["loss"])  # other text
    assert "a domain the calibration never saw" in report.format_table()
    # drawing from both corpora leaves no unseen domain; the report says nothing of one
    both = compile_model(src, tmp_path / "b.onnx", passes=["cleanup"], **{**CALIB, "calib": ["default"]})
    assert "SOTU" in both.calibration and "BBC" in both.calibration
    assert not both.fidelity_unseen and "never saw" not in both.format_table()


def test_a_decoder_with_a_large_vocabulary_calibrates_in_smaller_batches():
    """Its logits are most of what a compile's sessions allocate."""
    from onnxpress.compile import BATCH_SIZE, default_batch_size

    model = load_model(tiny_model("llama", with_past=True))
    assert default_batch_size(model, 128) == BATCH_SIZE
    logits = next(v for v in model.graph.outputs if v.name == "logits")
    logits.shape = ir.Shape(["batch_size", "sequence_length", 49152])  # SmolLM2's vocabulary
    assert default_batch_size(model, 128) == 1
    logits.shape = ir.Shape(["batch_size", "sequence_length", 16384])
    assert default_batch_size(model, 128) == 4


def test_batch_limits_count_samples_whatever_size_the_batches_run_at():
    """A pass limited to N calibration batches fits on N * BATCH_SIZE samples whether the compile
    runs them 8 or 1 at a time, so a large-vocabulary decoder's smaller batches do not shrink what
    GPTQ, pruning or the search's probes see."""
    from onnxpress.calibration import BATCH_SIZE, leading_batches

    ids = np.arange(64 * 4).reshape(64, 4)
    for size in (8, 3, 1):
        batches = [{"input_ids": ids[i : i + size]} for i in range(0, 64, size)]
        ctx = CompileContext(verification=[], calibration=CalibrationSet(batches, "t"))
        for n in (1, 2, 5):
            rows = np.concatenate([b["input_ids"] for b in ctx.calibration_batches("p", n)])
            assert len(rows) >= n * BATCH_SIZE > len(rows) - size  # whole batches, none past the limit
            np.testing.assert_array_equal(rows, ids[: len(rows)])
        assert len(ctx.calibration_batches("p")) == len(leading_batches(batches, 0)) == len(batches)
        assert len(leading_batches(batches, 100)) == len(batches)
