"""The command line: success paths, and every bad input as one line with no output left behind."""

import json
import re
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from onnxpress.cli import main
from onnxpress.pass_infra import Outcome, Pass, register_pass

from graphs import mlp_model, save


@register_pass
class NeedsAttentionPass(Pass):
    """Stands in for any attention-dependent pass (head pruning, attention fusion)."""

    name = "test_needs_attention"
    needs_attention = True

    def apply(self, model, ctx):
        return Outcome()


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, message):
    assert code == 2
    assert err.startswith("onnxpress: error: ") and err.count("\n") == 1, err
    assert message in err
    assert "Traceback" not in err


def assert_no_output(tmp_path):
    leftovers = [p.name for p in (tmp_path / "out").iterdir()] if (tmp_path / "out").exists() else []
    assert leftovers == []


@pytest.fixture
def mlp(tmp_path):
    return save(mlp_model(), tmp_path / "mlp.onnx")


def test_compile_cleanup_writes_model_and_report(capsys, tmp_path, mlp):
    out = tmp_path / "out" / "mlp.clean.onnx"
    code, stdout, _ = run_cli(capsys, "compile", mlp, "-o", out, "--recipe", "lossless")
    assert code == 0, stdout
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["cleanup"]
    row = report["passes"][0]
    assert row["modified"] and row["changes"]["nodes_removed"] >= 3  # Mul folded, Identity, dead Sigmoid
    assert row["measured_error"] <= 1e-6
    # the table speaks in the model's terms (here: row cosine, no attention mask); rel L2 stays in the JSON
    assert report["fidelity"] == row["vs_input"] and row["vs_input"]["cosine_min"] > 1 - 1e-6
    assert "fidelity vs input on 2 synthetic samples: output cosine 1.0000 mean / 1.0000 min" in stdout
    assert "rel L2" not in stdout
    assert "cleanup" in stdout and "report:" in stdout
    x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    ref = ort.InferenceSession(str(mlp)).run(None, {"x": x})[0]
    new = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    np.testing.assert_allclose(new, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_text("not a model at all"), "not a readable ONNX model"),
        (lambda p: p.write_bytes(save(mlp_model(), p).read_bytes()[:150]), "not a readable ONNX model"),
    ],
    ids=["not-onnx", "truncated"],
)
@pytest.mark.parametrize("command", ["compile", "inspect"])
def test_unreadable_models(capsys, tmp_path, make, message, command):
    bad = tmp_path / "bad.onnx"
    make(bad)
    extra = ["-o", tmp_path / "out" / "o.onnx"] if command == "compile" else []
    code, _, err = run_cli(capsys, command, bad, *extra)
    assert_one_line_error(code, err, message)
    assert_no_output(tmp_path)


def test_missing_external_data(capsys, tmp_path):
    src = save(mlp_model(), tmp_path / "ext.onnx", external=True)
    (tmp_path / "ext.onnx.data").unlink()
    code, _, err = run_cli(capsys, "compile", src, "-o", tmp_path / "out" / "o.onnx")
    assert_one_line_error(code, err, "keeps weights in 'ext.onnx.data', which is missing")
    assert_no_output(tmp_path)


def test_model_without_attention_names_the_passes_that_cannot_apply(capsys, tmp_path, mlp):
    out = tmp_path / "out" / "o.onnx"
    code, _, err = run_cli(capsys, "compile", mlp, "-o", out, "--passes", "cleanup", "test_needs_attention")
    assert_one_line_error(code, err, "no transformer attention recognised")
    assert "test_needs_attention cannot apply" in err
    assert_no_output(tmp_path)


def test_unknown_pass_and_bad_setting(capsys, tmp_path, mlp):
    out = tmp_path / "out" / "o.onnx"
    code, _, err = run_cli(capsys, "compile", mlp, "-o", out, "--passes", "cleanup", "prune_everything")
    assert_one_line_error(code, err, "unknown pass 'prune_everything'; available passes:")
    code, _, err = run_cli(capsys, "compile", mlp, "-o", out, "--passes", "cleanup:max_folded_size=big")
    assert_one_line_error(code, err, "cleanup: 'max_folded_size' must be an integer")
    code, _, err = run_cli(capsys, "compile", mlp, "-o", out, "--recipe", "nonexistent")
    assert_one_line_error(code, err, "neither a packaged recipe nor a file")
    assert_no_output(tmp_path)


def test_calibration_that_does_not_match_the_model_inputs(capsys, tmp_path, mlp):
    out = tmp_path / "out" / "o.onnx"
    np.savez(tmp_path / "wrong_name.npz", input_ids=np.zeros((4, 8), np.int64))
    code, _, err = run_cli(capsys, "compile", mlp, "-o", out, "--recipe", "lossless", "--calib", tmp_path / "wrong_name.npz")
    assert_one_line_error(code, err, "'x'")
    np.savez(tmp_path / "wrong_rank.npz", x=np.zeros((4, 8, 2), np.float32))
    code, _, err = run_cli(capsys, "compile", mlp, "-o", out, "--recipe", "lossless", "--calib", tmp_path / "wrong_rank.npz")
    assert_one_line_error(code, err, "rank")
    assert_no_output(tmp_path)


def test_output_name_must_be_onnx(capsys, tmp_path, mlp):
    code, _, err = run_cli(capsys, "compile", mlp, "-o", tmp_path / "out" / "model.bin")
    assert_one_line_error(code, err, "must end in .onnx")


def test_no_traceback_from_a_real_process(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("garbage")
    proc = subprocess.run(
        [sys.executable, "-m", "onnxpress", "compile", str(bad), "-o", str(tmp_path / "o.onnx")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("command", ["export", "inspect", "compile", "eval", "generate"])
def test_help_shows_examples(capsys, command):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "examples:" in capsys.readouterr().out


@pytest.mark.parametrize("arch", ["qwen3", "gemma", "phi3", "granite", "modernbert"])
def test_inspect_reports_the_configured_geometry(capsys, arch):
    from tiny_models import tiny_config_values, tiny_model

    code, out, _ = run_cli(capsys, "inspect", tiny_model(arch), "--json")
    assert code == 0
    cfg = tiny_config_values(arch)
    layers = json.loads(out)["layers"]
    assert len(layers) == cfg["num_layers"]
    for layer in layers:
        assert (layer["num_heads"], layer["num_kv_heads"], layer["head_size"], layer["ffn_size"]) == (
            cfg["num_heads"], cfg["num_kv_heads"], cfg["head_size"], cfg["ffn_size"])


def test_generate_prints_the_text_and_the_speed(capsys):
    from onnxpress.datasets import load_tokenizer
    from onnxpress.model_io import load_model

    from tiny_models import greedy_tokens, tiny_model

    path = tiny_model("llama", with_past=True)
    code, out, err = run_cli(capsys, "generate", path, "--prompt", "the quick brown fox", "--max-new-tokens", 6,
                             "--threads", 1)
    assert code == 0, err
    text, stats = out.rstrip("\n").rsplit("\n", 1)
    tokenizer = load_tokenizer(path.parent)
    prompt = tokenizer("the quick brown fox")["input_ids"]
    expected = greedy_tokens(ort.InferenceSession(str(path)), load_model(path), np.array([prompt]), 6, True)
    assert 3 not in expected[:-1] and 2 not in expected[:-1]  # no end-of-sequence token before the last
    assert text == tokenizer.decode(expected, skip_special_tokens=True)
    assert re.fullmatch(rf"prompt tokens {len(prompt)}, new tokens 6, prefill [0-9.]+ ms, decode [0-9.]+ tokens/s", stats)
    sampled = [run_cli(capsys, "generate", path, "--prompt", "the quick brown fox", "--sample", "--temperature", 3,
                       "--top-p", 0.9, "--seed", seed)[1].splitlines()[0] for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_generate_bad_inputs_are_one_line_errors(capsys, tmp_path):
    import shutil

    from tiny_models import tiny_model

    decoder = tiny_model("llama", with_past=True)
    shutil.copy(decoder, tmp_path / "alone.onnx")
    cases = [
        ([tmp_path / "missing.onnx"], "missing.onnx does not exist"),
        ([tiny_model("bert")], "no 'logits' output, so it is not a decoder"),
        ([tmp_path / "alone.onnx"], "no tokenizer next to"),
        ([decoder, "--tokenizer", tmp_path], "holds no tokenizer files"),
        ([decoder, "--temperature", 0.5], "--temperature only shape sampled tokens: add --sample"),
        ([decoder, "--sample", "--top-p", 1.5], "top-p 1.5 must be in (0, 1]"),
        ([decoder, "--max-new-tokens", 0], "max new tokens 0 must be at least 1"),
    ]
    for args, message in cases:
        code, _, err = run_cli(capsys, "generate", *args, "--prompt", "the nation")
        assert_one_line_error(code, err, message)
