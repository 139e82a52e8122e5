import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxpress import model_io
from onnxpress.errors import OnnxpressError
from onnxpress.model_io import MAX_IR_VERSION, load_model, save_model

from graphs import mlp_model, save


def test_roundtrip_keeps_numerics_and_writes_a_loadable_ir_version(tmp_path):
    src = save(mlp_model(), tmp_path / "in.onnx")
    model = load_model(src)
    out = save_model(model, tmp_path / "out.onnx")
    assert onnx.load(out).ir_version <= MAX_IR_VERSION
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    a = ort.InferenceSession(str(src)).run(None, {"x": x})[0]
    b = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(a, b)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".onnxpress")] == []


def test_opset_21_model_gets_ir_10_not_onnx_default_14(tmp_path):
    proto = mlp_model()
    proto.opset_import[0].version = 21
    model = load_model(save(proto, tmp_path / "m.onnx"))
    out = save_model(model, tmp_path / "out.onnx")
    assert onnx.load(out).ir_version == 10
    ort.InferenceSession(str(out))


def test_external_data_is_loaded_lazily_and_saved_on_request(tmp_path):
    src = save(mlp_model(), tmp_path / "ext.onnx", external=True)
    model = load_model(src)
    assert all(v.const_value.__class__.__name__ == "ExternalTensor" for v in model.graph.initializers.values())
    out = save_model(model, tmp_path / "o" / "out.onnx", external_data=True)
    assert (out.parent / "out.onnx.data").exists()
    ort.InferenceSession(str(out))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_text("hello, not a model"), "not a readable ONNX model"),
        (lambda p: p.write_bytes(save(mlp_model(), p).read_bytes()[:200]), "not a readable ONNX model"),
        (lambda p: p.write_bytes(b""), "is empty"),
    ],
    ids=["not-onnx", "truncated", "empty"],
)
def test_bad_files_give_one_line_errors(tmp_path, make, message):
    path = tmp_path / "bad.onnx"
    make(path)
    with pytest.raises(OnnxpressError, match=message) as info:
        load_model(path)
    assert "\n" not in str(info.value)


def test_missing_and_truncated_external_data(tmp_path):
    src = save(mlp_model(), tmp_path / "ext.onnx", external=True)
    data = tmp_path / "ext.onnx.data"
    blob = data.read_bytes()
    data.write_bytes(blob[:10])
    with pytest.raises(OnnxpressError, match="shorter than the model expects"):
        load_model(src)
    data.unlink()
    with pytest.raises(OnnxpressError, match="missing"):
        load_model(src)


@pytest.mark.parametrize("relative", [True, False])
def test_external_data_outside_the_model_folder_is_a_one_line_error(tmp_path, relative):
    folder = tmp_path / "model"
    folder.mkdir()
    src = save(mlp_model(), folder / "ext.onnx", external=True)
    proto = onnx.load(src, load_external_data=False)
    location = "../outside.data" if relative else str(tmp_path / "absolute.data")
    target = (folder / location).resolve()
    target.write_bytes((folder / "ext.onnx.data").read_bytes())
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, src)
    with pytest.raises(OnnxpressError, match="outside the model's folder") as info:
        load_model(src)
    assert "\n" not in str(info.value)


def test_missing_file_and_bad_output_name(tmp_path):
    with pytest.raises(OnnxpressError, match="does not exist"):
        load_model(tmp_path / "nope.onnx")
    model = load_model(save(mlp_model(), tmp_path / "m.onnx"))
    with pytest.raises(OnnxpressError, match="must end in .onnx"):
        save_model(model, tmp_path / "out.bin")


def test_a_weight_spill_writes_large_weights_page_aligned_and_keeps_the_rest_in_memory(tmp_path):
    spill = model_io.WeightSpill(tmp_path)
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((512, 513)).astype(np.float32), rng.integers(0, 255, (1100, 1000), dtype=np.uint8)]
    for array in weights:
        tensor = spill.tensor(array, "w")
        assert isinstance(tensor, ir.ExternalTensor) and tensor.offset % model_io.WeightSpill.ALIGN == 0
        np.testing.assert_array_equal(tensor.numpy(), array)
    assert spill.nbytes == sum(a.nbytes for a in weights)
    # small tensors, and integers that shape inference may read, stay in memory
    for array in (np.ones(4, np.float32), np.zeros(2**18, np.int64), np.float32(2.0)):
        assert not isinstance(spill.tensor(np.asarray(array)), ir.ExternalTensor)
    spill.close()
