"""Building, finding and registering libonnxpress_ops.so; user-facing error paths."""

import json
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import onnxpress.runtime_ops as rt
from onnxpress.errors import OnnxpressError
from onnxpress.runtime_ops import builder, loader

from attention_reference import IR_VERSION, attention_op_model, decomposed_attention_model, random_inputs


def test_library_reports_api_version_17(ops_library):
    assert rt.library_api_version(ops_library) == 17
    assert not rt.library_has_cuda(ops_library)
    info = json.loads((ops_library.parent / "build_info.json").read_text())
    assert info["ort_api_version"] == 17


def test_build_is_cached(ops_library):
    assert rt.build(cuda=False) == ops_library
    assert rt.find_built(cuda=False) == ops_library


def test_cli_build_prints_the_path(ops_library):
    result = subprocess.run([sys.executable, "-m", "onnxpress.runtime_ops", "build", "--no-cuda"],
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == str(ops_library)


def test_library_path_env_override(monkeypatch, ops_library, tmp_path):
    monkeypatch.setenv(rt.LIBRARY_ENV, str(ops_library))
    assert rt.library_path() == ops_library
    monkeypatch.setenv(rt.LIBRARY_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(OnnxpressError, match="does not exist"):
        rt.library_path()


def test_library_path_without_a_build(monkeypatch, tmp_path):
    monkeypatch.delenv(rt.LIBRARY_ENV, raising=False)
    monkeypatch.delenv("ONNXPRESS_ORT_INCLUDE_DIR", raising=False)
    monkeypatch.setenv("ONNXPRESS_CACHE_DIR", str(tmp_path))
    with pytest.raises(OnnxpressError, match="not built"):
        rt.library_path(build_if_missing=False, cuda=False)


def test_register_missing_library(tmp_path):
    with pytest.raises(OnnxpressError, match="missing"):
        rt.register(ort.SessionOptions(), library=tmp_path / "libonnxpress_ops.so")


def test_register_rejects_a_newer_api_than_onnxruntime(monkeypatch, ops_library):
    monkeypatch.setattr(loader, "installed_ort_api_version", lambda: 16)
    with pytest.raises(OnnxpressError, match="built for ONNX Runtime API 17"):
        rt.register(ort.SessionOptions(), library=ops_library)


def test_register_is_idempotent(ops_library):
    feeds = random_inputs(np.random.default_rng(0), 1, 3, 3, 2, 2, 4)
    options = rt.register(rt.register(ort.SessionOptions(), library=ops_library), library=ops_library)
    session = ort.InferenceSession(attention_op_model(feeds, num_heads=2).SerializeToString(), options)
    assert session.run(None, feeds)[0].shape == (1, 3, 8)


def test_missing_cmake_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(builder.shutil, "which", lambda name: None)
    with pytest.raises(OnnxpressError, match="cmake not found"):
        rt.build(cuda=False)


def test_bad_include_dir(tmp_path):
    with pytest.raises(OnnxpressError, match="no ONNX Runtime headers"):
        rt.ort_include_dir(tmp_path)


def _plain_model():
    feeds = random_inputs(np.random.default_rng(0), 1, 2, 2, 1, 1, 4)
    return decomposed_attention_model(feeds, num_heads=1)


def _onnxpress_model():
    return attention_op_model(random_inputs(np.random.default_rng(0), 1, 2, 2, 1, 1, 4), num_heads=1)


def test_uses_onnxpress_ops_accepts_every_model_form(tmp_path):
    model = _onnxpress_model()
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    for form in (model, model.SerializeToString(), path, str(path), onnx_ir.serde.deserialize_model(model)):
        assert rt.uses_onnxpress_ops(form)
    plain = _plain_model()
    assert not rt.uses_onnxpress_ops(plain)
    assert not rt.uses_onnxpress_ops(onnx_ir.serde.deserialize_model(plain))


def test_uses_onnxpress_ops_looks_into_subgraphs():
    inner = _onnxpress_model().graph
    branch = helper.make_graph(list(inner.node), "branch", [], list(inner.output))
    condition = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    node = helper.make_node("If", ["cond"], ["output"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph([node], "g", [condition, *inner.input], list(inner.output))
    model = helper.make_model(graph, ir_version=IR_VERSION)
    assert rt.uses_onnxpress_ops(model)
    assert rt.uses_onnxpress_ops(onnx_ir.serde.deserialize_model(model))


def test_session_options_for_registers_only_when_needed(ops_library, monkeypatch):
    monkeypatch.setenv(rt.LIBRARY_ENV, str(ops_library))
    options = rt.session_options_for(_onnxpress_model())
    assert options.get_session_config_entry("onnxpress.ops_library") == str(ops_library)
    ort.InferenceSession(_onnxpress_model().SerializeToString(), options)
    plain = rt.session_options_for(_plain_model())
    with pytest.raises(RuntimeError):
        plain.get_session_config_entry("onnxpress.ops_library")


def test_make_attention_node_schema():
    node = rt.make_attention_node("q", "k", "v", "o", num_heads=8, kv_num_heads=2, causal=True, window=4,
                                  past_key="pk", past_value="pv", present_value="present_v")
    assert (node.domain, node.op_type) == ("onnxpress", "Attention")
    assert list(node.input) == ["q", "k", "v", "", "pk", "pv"]
    assert list(node.output) == ["o", "", "present_v"]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"num_heads": 8, "kv_num_heads": 2, "causal": 1, "window": 4}
    with pytest.raises(OnnxpressError, match="divide"):
        rt.make_attention_node("q", "k", "v", "o", num_heads=6, kv_num_heads=4)
    with pytest.raises(OnnxpressError, match="together"):
        rt.make_attention_node("q", "k", "v", "o", num_heads=2, past_key="pk")


def _raw_model(feeds, **attributes):
    """Like attention_op_model but without make_attention_node's checks (to reach kernel errors)."""
    model = attention_op_model(feeds, num_heads=1)
    node = model.graph.node[0]
    del node.attribute[:]
    node.attribute.extend(helper.make_attribute(k, v) for k, v in attributes.items())
    return model


def _run(make_session, model, feeds):
    return make_session(model).run(None, feeds)


ERROR_CASES = {
    "key-hidden": (dict(num_heads=4), lambda f: f.update(key=f["key"][:, :, :-4]), "key has shape"),
    "mask-length": (dict(num_heads=4), lambda f: f.update(attention_mask=np.ones((2, 5), np.int64)),
                    "attention_mask has shape"),
    "mask-dtype": (dict(num_heads=4), lambda f: f.update(attention_mask=np.ones((2, 6), np.int8)),
                   "attention_mask must be bool"),
    "heads-vs-hidden": (dict(num_heads=5), lambda f: None, "query hidden size 32 is not a positive multiple"),
    "value-shape": (dict(num_heads=4), lambda f: f.update(value=f["value"][:, :3]), "value shape"),
    "query-rank": (dict(num_heads=4), lambda f: f.update(query=f["query"][0]), "query must be 3-D"),
    "past-shape": (dict(num_heads=4), lambda f: f.update(past_key=np.zeros((2, 4, 3, 5), np.float32),
                                                         past_value=np.zeros((2, 4, 3, 5), np.float32)),
                   "past_key has shape"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_inputs_fail_with_a_clear_message(make_session, case):
    attributes, mutate, message = ERROR_CASES[case]
    feeds = random_inputs(np.random.default_rng(0), 2, 6, 6, 4, 4, 8)
    mutate(feeds)
    model = _raw_model(feeds, **attributes)
    with pytest.raises(Exception, match=f"onnxpress.Attention: {message}"):
        _run(make_session, model, feeds)


@pytest.mark.parametrize(
    ("attributes", "message"),
    [({"num_heads": 6, "kv_num_heads": 4}, "kv_num_heads=4 must be > 0 and divide num_heads=6"),
     ({"kv_num_heads": 1}, "attribute num_heads"),
     ({"num_heads": 2, "window": -1}, "window must be >= 0"),
     ({"num_heads": 2, "scale": 1}, "scale must be a float")],
)
def test_bad_attributes_fail_at_session_creation(make_session, attributes, message):
    feeds = random_inputs(np.random.default_rng(0), 1, 2, 2, 2, 2, 4)
    with pytest.raises(Exception, match=message):
        make_session(_raw_model(feeds, **attributes))
