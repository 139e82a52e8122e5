"""Models over the protobuf limit (2 GB), and models whose weights are in external data files.

ONNX Runtime sessions of such a model are built from a protobuf without its weights: those
still in the input's data file are read by ONNX Runtime from that file, the others handed
over as OrtValues (``model_io.session_model``); the checker sees stand-ins for the files. The same code runs for a model of any size once it is over the limit, so the
tests lower the limit to a few kilobytes and compile a tiny model through it: every stage,
activation capture, the low-rank probes and the output (saved with external data) take the
large-model path, and give what the ordinary path gives.
"""

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxpress import model_io
from onnxpress.calibration import make_feeds
from onnxpress.compile import compile_model
from onnxpress.model_io import load_model, session_model
from onnxpress.runtime import make_session, run_batches

from tiny_models import VOCAB, tiny_model

LIMIT = 64 * 1024


def _feeds(model):
    ids = np.random.default_rng(0).integers(5, VOCAB, size=(2, 9), dtype=np.int64)
    return [make_feeds(model, ids, np.ones_like(ids))]


def test_a_session_over_the_limit_keeps_the_weights_out_of_the_protobuf(monkeypatch):
    model = load_model(tiny_model("llama", with_past=True))
    expected = run_batches(make_session(session_model(model)), _feeds(model))
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", LIMIT)

    source = session_model(model)
    kept_out = sum(a.nbytes for a in source.weights.values())
    assert kept_out > 0.9 * model_io.model_nbytes(model) and len(source.proto) < kept_out / 4
    source.check()
    outputs = run_batches(make_session(source), _feeds(model))
    for got, want in zip(outputs, expected, strict=True):
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])


def test_compiling_over_the_limit_gives_what_compiling_under_it_gives(monkeypatch, tmp_path):
    calib = tmp_path / "ids.npz"
    np.savez(calib, input_ids=np.random.default_rng(0).integers(5, VOCAB, (16, 32)))
    passes = ["cleanup", "prune_ffn:fraction=0.25", "lowrank:fraction=0.1", "attention:optional=true",
              "quantize:mode=dynamic"]
    src = tiny_model("llama", with_past=True)
    small = compile_model(src, tmp_path / "small.onnx", passes=passes, calib=[calib], progress=False, threads=1,
                          external_data=False)
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", LIMIT)
    large = compile_model(src, tmp_path / "large.onnx", passes=passes, calib=[calib], progress=False, threads=1)

    assert (tmp_path / "large.onnx.data").exists() and not (tmp_path / "small.onnx.data").exists()
    for a, b in zip(small.passes, large.passes, strict=True):
        assert a.changes == b.changes, a.name
        assert b.measured_error == pytest.approx(a.measured_error, rel=1e-3, abs=1e-7), a.name
    model = load_model(tmp_path / "large.onnx")
    got = run_batches(make_session(tmp_path / "large.onnx"), _feeds(model))
    want = run_batches(make_session(tmp_path / "small.onnx"), _feeds(model))
    np.testing.assert_allclose(got[0]["logits"], want[0]["logits"], rtol=1e-4, atol=1e-4)


def test_weights_in_an_external_data_file_reach_the_session_from_that_file(tmp_path):
    """A session of a model whose weights are in an external data file is built from a protobuf
    that still points to that file, which ONNX Runtime maps itself (no copy of the weights in
    this process); a weight a pass rewrote goes in memory, the others still come from the file."""
    src = model_io.save_model(load_model(tiny_model("llama", with_past=True)), tmp_path / "src" / "model.onnx",
                              external_data=True)
    model = load_model(src)
    expected = run_batches(make_session(src), _feeds(model))
    source = session_model(model)
    assert not source.weights and Path(source.data_folder).resolve() == src.parent.resolve()
    assert len(source.proto) < model_io.model_nbytes(model) / 4
    source.check()
    for got, want in zip(run_batches(make_session(source), _feeds(model)), expected, strict=True):
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])

    value = next(v for v in model.graph.initializers.values() if v.const_value.size > 1000)
    value.const_value = ir.tensor(value.const_value.numpy() * 2)
    rewritten = session_model(model)
    assert rewritten.data_folder == source.data_folder and len(rewritten.proto) > len(source.proto)
    inlined = model_io.save_model(model, tmp_path / "inlined.onnx", external_data=False)
    got = run_batches(make_session(rewritten), _feeds(model))
    want = run_batches(make_session(inlined), _feeds(model))
    np.testing.assert_array_equal(got[0]["logits"], want[0]["logits"])
    assert not np.array_equal(got[0]["logits"], expected[0]["logits"])


def test_a_model_with_external_data_compiles_through_every_session(tmp_path):
    """Weights memory-mapped from an external data file: sessions, the segments of sequential
    GPTQ included, read them from that file; the quantizer's fusion check writes its optimised
    copy beside its own weights file."""
    src = model_io.save_model(load_model(tiny_model("llama", with_past=True)), tmp_path / "src" / "model.onnx",
                              external_data=True)
    assert (tmp_path / "src" / "model.onnx.data").exists()
    calib = tmp_path / "ids.npz"
    np.savez(calib, input_ids=np.random.default_rng(0).integers(5, VOCAB, (8, 16)))
    report = compile_model(src, tmp_path / "out.onnx", passes=["cleanup", "quantize:mode=weight_only,bits=4"],
                           calib=[calib], progress=False, threads=1)
    quantize = report.passes[-1]
    assert quantize.measured_error is not None and quantize.changes["fused_integer_kernels"] > 0
    assert quantize.changes["matmuls_gptq"] == quantize.changes["matmuls_quantized"]


def test_an_output_without_external_data_holds_the_weights_it_kept_from_the_input(tmp_path):
    """Weights the compile did not rewrite are still read from the input's external data file;
    an output saved without external data must hold them itself (and load with the input gone)."""
    src = model_io.save_model(load_model(tiny_model("llama", with_past=True)), tmp_path / "src" / "model.onnx",
                              external_data=True)
    out = tmp_path / "out" / "model.onnx"
    compile_model(src, out, passes=["cleanup", "quantize:mode=weight_only,bits=4,gptq=false"], progress=False,
                  threads=1, external_data=False)
    for path in (tmp_path / "src").iterdir():
        path.unlink()
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.report.json"]
    model = load_model(out)
    assert run_batches(make_session(out), _feeds(model))[0]["logits"].shape[-1] == VOCAB


def test_the_input_size_reported_counts_an_exporters_data_file(tmp_path):
    """Exporters name the data file their own way (optimum: ``model.onnx_data``); the report's
    size before the compile is the model file and whatever data files its weights are in."""
    import onnx

    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    onnx.save(onnx.load(tiny_model("llama", with_past=True)), src, save_as_external_data=True,
              location="model.onnx_data", size_threshold=1024)
    report = compile_model(src, tmp_path / "out.onnx", passes=["cleanup"], progress=False, threads=1)
    data = src.with_name("model.onnx_data").stat().st_size
    assert data > 100_000
    assert report.size_before == src.stat().st_size + data


def test_weights_made_for_a_model_mapped_from_its_data_file_wait_on_disk_until_saved(tmp_path, monkeypatch):
    """A compile of a model whose weights are mapped from its data file writes the weights its
    passes make to a spill file as they are made (sessions and later passes map them back), and
    gives what the same compile of the model held in memory gives; the spill file goes at the end."""
    monkeypatch.setattr(model_io.WeightSpill, "MIN_BYTES", 1)  # the tiny model's weights are small
    made = []
    spill_tensor = model_io.WeightSpill.tensor
    monkeypatch.setattr(model_io.WeightSpill, "tensor",
                        lambda self, array, name=None: made.append(spill_tensor(self, array, name)) or made[-1])
    calib = tmp_path / "ids.npz"
    np.savez(calib, input_ids=np.random.default_rng(0).integers(5, VOCAB, (16, 32)))
    passes = ["cleanup", "prune_ffn:fraction=0.25", "lowrank:fraction=0.1", "quantize:mode=weight_only,bits=4"]
    model = load_model(tiny_model("llama", with_past=True))
    mapped = model_io.save_model(model, tmp_path / "mapped" / "model.onnx", external_data=True)
    held = model_io.save_model(model, tmp_path / "held" / "model.onnx", external_data=False)

    spilled = compile_model(mapped, tmp_path / "out" / "spilled.onnx", passes=passes, calib=[calib], progress=False,
                            threads=1)
    on_disk = [t for t in made if isinstance(t, ir.ExternalTensor)]
    assert len(on_disk) > 20 and {t.location for t in on_disk} == {model_io.WeightSpill.FILE}
    assert not list((tmp_path / "out").glob(".onnxpress-*"))  # the spill folder is gone
    made.clear()
    in_memory = compile_model(held, tmp_path / "out" / "held.onnx", passes=passes, calib=[calib], progress=False,
                              threads=1)
    assert not made  # nothing spilled for a model held in memory
    for a, b in zip(spilled.passes, in_memory.passes, strict=True):
        assert a.changes == b.changes, a.name
        assert a.measured_error == pytest.approx(b.measured_error, rel=1e-4, abs=1e-7), a.name
    got = run_batches(make_session(tmp_path / "out" / "spilled.onnx"), _feeds(model))
    want = run_batches(make_session(tmp_path / "out" / "held.onnx"), _feeds(model))
    np.testing.assert_allclose(got[0]["logits"], want[0]["logits"], rtol=1e-5, atol=1e-5)


def test_an_output_folder_that_cannot_be_made_is_a_one_line_error(tmp_path):
    """Checked before the spill file of a model mapped from its data file is made, and at the save."""
    from onnxpress.errors import OnnxpressError

    src = model_io.save_model(load_model(tiny_model("llama", with_past=True)), tmp_path / "src" / "model.onnx",
                              external_data=True)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OnnxpressError, match="cannot create the output folder .*choose an output path"):
        compile_model(src, tmp_path / "file" / "sub" / "out.onnx", passes=["cleanup"], progress=False, threads=1)
