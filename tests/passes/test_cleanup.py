import json

import numpy as np
import onnx
import pytest

from onnxpress.compile import compile_model, report_path
from onnxpress.model_io import load_model
from onnxpress.passes.cleanup import CleanupPass
from onnxpress.pipeline import CompileContext, Pipeline
from onnxpress.runtime import make_session

from graphs import mlp_model, save


def test_cleanup_removes_dead_and_foldable_nodes_without_changing_outputs(tmp_path):
    model = load_model(save(mlp_model(), tmp_path / "m.onnx"))
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    ctx = CompileContext(verification=[{"x": x}])
    (result,) = Pipeline([CleanupPass()], progress=False).run(model, ctx)
    ops = [n.op_type for n in model.graph]
    assert "Sigmoid" not in ops and "Identity" not in ops and ops.count("Mul") == 0
    assert "unused_init" not in model.graph.initializers
    assert result.changes["nodes_removed"] == 3 and result.modified
    assert result.error <= 1e-7 and result.measured_error <= 1e-7
    assert result.params_after < result.params_before  # the dead initializer is gone


def test_cleanup_is_idempotent(tmp_path):
    model = load_model(save(mlp_model(dead_branch=False), tmp_path / "m.onnx"))
    ctx = CompileContext(verification=[{"x": np.ones((2, 8), np.float32)}])
    Pipeline([CleanupPass()], progress=False).run(model, ctx)
    (again,) = Pipeline([CleanupPass()], progress=False).run(model, ctx)
    assert not again.modified and again.changes["nodes_removed"] == 0


@pytest.mark.real_model
def test_lossless_recipe_on_minilm_keeps_embeddings_to_1e5(tmp_path, minilm_onnx):
    out = tmp_path / "minilm.clean.onnx"
    report = compile_model(minilm_onnx, out, recipe="lossless", progress=False)
    assert [p.name for p in report.passes] == ["cleanup", "attention"]
    assert [p["name"] for p in json.loads(report_path(out).read_text())["passes"]] == ["cleanup", "attention"]
    onnx.checker.check_model(str(out))
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(100, 30000, (2, 24)).astype(np.int64),
        "attention_mask": np.ones((2, 24), np.int64),
        "token_type_ids": np.zeros((2, 24), np.int64),
    }
    feeds["attention_mask"][1, 15:] = 0
    ref, new = (make_session(p).run(None, feeds)[0] for p in (minilm_onnx, out))
    np.testing.assert_allclose(new, ref, atol=1e-5, rtol=0)
