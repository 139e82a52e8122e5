"""``inline_weights.move_weights_out``: an inline model rewritten with its weights in a data file,
field by field; and a compile of an inline model from such a copy (``model_io.compile_input``)."""

import numpy as np
import onnx
import pytest

from onnxpress import inline_weights, model_io
from onnxpress.calibration import make_feeds
from onnxpress.compile import compile_model
from onnxpress.errors import OnnxpressError
from onnxpress.model_io import load_model
from onnxpress.runtime import make_session, run_batches

from tiny_models import VOCAB, tiny_model


def _inline(tmp_path):
    src = tmp_path / "inline" / "model.onnx"
    src.parent.mkdir()
    onnx.save(onnx.load(tiny_model("llama", with_past=True)), src)
    return src


def test_moved_weights_read_back_as_the_same_model_and_start_on_pages(tmp_path):
    src = _inline(tmp_path)
    copy = tmp_path / "copy" / "input.onnx"
    copy.parent.mkdir()
    moved = inline_weights.move_weights_out(src, copy, "input.onnx.data")

    data = copy.with_name("input.onnx.data")
    assert moved > 0.9 * src.stat().st_size and copy.stat().st_size < src.stat().st_size / 10
    proto = onnx.load(copy, load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    inline = [t for t in proto.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert external and all(len(t.raw_data) < inline_weights.MIN_BYTES for t in inline)
    offsets = [int(e.value) for t in external for e in t.external_data if e.key == "offset"]
    assert all(o % inline_weights.ALIGN == 0 for o in offsets) and data.stat().st_size >= moved

    onnx.load_external_data_for_model(proto, str(copy.parent))
    for tensor in proto.graph.initializer:
        tensor.ClearField("data_location")
    original = onnx.load(src)
    assert proto.SerializeToString(deterministic=True) == original.SerializeToString(deterministic=True)


@pytest.mark.parametrize("damage", ["truncated", "not_onnx", "external"])
def test_a_file_that_cannot_be_moved_says_so(tmp_path, damage):
    src = _inline(tmp_path)
    if damage == "truncated":
        src.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    elif damage == "not_onnx":
        src.write_bytes(b"\xff" * 1000)
    else:
        onnx.save(onnx.load(src), src, save_as_external_data=True, location="model.onnx.data", size_threshold=1024)
    with pytest.raises(inline_weights.NotMovable):
        inline_weights.move_weights_out(src, tmp_path / "input.onnx", "input.onnx.data")


def test_a_truncated_inline_model_is_a_one_line_error_when_compiled_from_a_moved_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(model_io, "INLINE_MAP_MIN_BYTES", 0)
    src = _inline(tmp_path)
    src.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(OnnxpressError, match="not a readable ONNX model"):
        compile_model(src, tmp_path / "out" / "out.onnx", passes=["cleanup"], progress=False, threads=1)
    assert not list((tmp_path / "out").glob("*"))  # nothing left behind, the scratch folder neither


def test_an_inline_model_compiled_from_a_moved_copy_gives_what_compiling_it_in_memory_gives(tmp_path, monkeypatch):
    calib = tmp_path / "ids.npz"
    np.savez(calib, input_ids=np.random.default_rng(0).integers(5, VOCAB, (16, 32)))
    passes = ["cleanup", "prune_ffn:fraction=0.25", "lowrank:fraction=0.1", "quantize:mode=weight_only,bits=4"]
    src = _inline(tmp_path)
    in_memory = compile_model(src, tmp_path / "out" / "held.onnx", passes=passes, calib=[calib], progress=False,
                              threads=1)
    monkeypatch.setattr(model_io, "INLINE_MAP_MIN_BYTES", 0)
    loaded = []
    monkeypatch.setattr(model_io, "load_model", lambda path: loaded.append(path) or load_model(path))
    moved = compile_model(src, tmp_path / "out" / "moved.onnx", passes=passes, calib=[calib], progress=False,
                          threads=1)

    assert [p.name for p in loaded] == ["input.onnx"]  # the copy, not the input itself
    assert not list((tmp_path / "out").glob(".onnxpress-*"))  # the copy is gone
    assert moved.size_before == in_memory.size_before == src.stat().st_size
    for a, b in zip(moved.passes, in_memory.passes, strict=True):
        assert a.changes == b.changes, a.name
        assert a.measured_error == pytest.approx(b.measured_error, rel=1e-4, abs=1e-7), a.name
    model = load_model(src)
    ids = np.random.default_rng(1).integers(5, VOCAB, size=(2, 9), dtype=np.int64)
    feeds = [make_feeds(model, ids, np.ones_like(ids))]
    got = run_batches(make_session(tmp_path / "out" / "moved.onnx"), feeds)
    want = run_batches(make_session(tmp_path / "out" / "held.onnx"), feeds)
    np.testing.assert_allclose(got[0]["logits"], want[0]["logits"], rtol=1e-5, atol=1e-5)


def test_no_room_for_the_moved_copy_is_a_one_line_error(tmp_path, monkeypatch):
    import errno

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model_io, "INLINE_MAP_MIN_BYTES", 0)
    monkeypatch.setattr(inline_weights, "move_weights_out", full)
    with pytest.raises(OnnxpressError, match="cannot write a copy of model.onnx's weights .*No space left.*free disk"):
        compile_model(_inline(tmp_path), tmp_path / "out" / "out.onnx", passes=["cleanup"], progress=False, threads=1)
    assert not list((tmp_path / "out").glob("*"))
