"""onnxpress.export: HF folder -> ONNX through optimum, offline; one-line errors; KV-cache decoders.

The tiny helpers here (``tiny_hf_dir``/``tiny_export``) build small random-weight HF models with
a small BPE tokenizer trained on SOTU calibration text, export them with ``export_model`` and
cache both under ``~/.cache/onnxpress/tests-eval/``; the other test files import them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from onnxpress.errors import OnnxpressError  # noqa: E402
from onnxpress.export import CACHE_ROOT, cached_export, export_model, resolve_model_source  # noqa: E402

TINY_VOCAB = 384
TINY_KINDS = ("llama", "bert")


def _cache_dir() -> Path:
    import transformers

    return CACHE_ROOT / "tests-eval" / transformers.__version__


def _train_tokenizer(kind: str):
    """Byte-level BPE trained on three calibration-split SOTU speeches (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from onnxpress.datasets import read_text, sotu_files

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] if kind == "bert" else ["<pad>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="[UNK]" if kind == "bert" else None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([read_text(f) for f in sotu_files("calibration")[:3]], trainer)
    if kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        model_input_names=["input_ids", "attention_mask"],
    )


def _tiny_hf_model(kind: str):
    import torch
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        # A larger init range than HF's 0.02 gives peaked next-token distributions.
        config = LlamaConfig(
            vocab_size=TINY_VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            initializer_range=0.2,
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        return LlamaForCausalLM(config).eval()
    config = BertConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
    )
    return BertModel(config).eval()


def _build_once(entry: Path, build) -> Path:
    if entry.exists():
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        build(tmp)
        os.replace(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


def tiny_hf_dir(kind: str) -> Path:
    """A cached HF folder of a tiny random-weight ``kind`` ('llama' or 'bert') with tokenizer."""

    def build(tmp: Path) -> None:
        _tiny_hf_model(kind).save_pretrained(tmp)
        _train_tokenizer(kind).save_pretrained(tmp)

    return _build_once(_cache_dir() / f"hf-{kind}", build)


def tiny_export(kind: str) -> Path:
    """``model.onnx`` of the tiny ``kind`` exported by ``export_model`` (default task), cached."""
    entry = _cache_dir() / f"onnx-{kind}"
    if not (entry / "model.onnx").exists():
        export_model(tiny_hf_dir(kind), entry)
    return entry / "model.onnx"


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message, message
    return message


# ---- errors ---------------------------------------------------------------------------------


def test_missing_source_is_one_line_error(tmp_path):
    with pytest.raises(OnnxpressError) as exc:
        resolve_model_source(tmp_path / "nope")
    assert "does not exist" in _one_line(exc) and "minilm" in str(exc.value)


def test_folder_without_config_is_one_line_error(tmp_path):
    with pytest.raises(OnnxpressError) as exc:
        export_model(tmp_path, tmp_path / "out")
    assert "config.json" in _one_line(exc)
    assert not (tmp_path / "out").exists()


def test_file_source_is_one_line_error(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(OnnxpressError) as exc:
        resolve_model_source(tmp_path / "model.bin")
    assert "folder" in _one_line(exc)


def test_unsupported_architecture_names_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "wav2vec2"}))
    with pytest.raises(OnnxpressError) as exc:
        export_model(tmp_path, tmp_path / "out")
    message = _one_line(exc)
    assert "wav2vec2" in message and "bert" in message and "llama" in message


def test_unavailable_task_is_one_line_error(tmp_path):
    with pytest.raises(OnnxpressError) as exc:
        export_model(tiny_hf_dir("bert"), tmp_path / "out", task="text-generation-with-past")
    assert "not available for 'bert'" in _one_line(exc) and "feature-extraction" in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_missing_export_extra_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    monkeypatch.setitem(sys.modules, "optimum.exporters.onnx", None)  # import now raises ImportError
    with pytest.raises(OnnxpressError) as exc:
        export_model(tmp_path, tmp_path / "out")
    assert "pip install onnxpress[export]" in _one_line(exc)


def test_failed_export_keeps_old_output_and_leaves_no_temp(tmp_path, monkeypatch):
    import optimum.exporters.onnx as exporter

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"old")

    def boom(*args, **kwargs):
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(exporter, "main_export", boom)
    with pytest.raises(RuntimeError):
        export_model(tiny_hf_dir("bert"), out)
    assert (out / "model.onnx").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- tiny exports ------------------------------------------------------------------------------


def test_tiny_encoder_export_matches_torch():
    import onnxruntime as ort
    import torch
    from transformers import AutoModel

    path = tiny_export("bert")
    assert (path.parent / "tokenizer.json").exists()  # optimum copies the tokenizer
    ids = np.array([[2, 40, 41, 42, 3], [2, 50, 51, 3, 0]], dtype=np.int64)
    mask = (np.arange(5) < np.array([[5], [4]])).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        ["last_hidden_state"], feeds
    )[0]
    with torch.no_grad():
        ref = AutoModel.from_pretrained(tiny_hf_dir("bert"))(
            **{k: torch.from_numpy(v) for k, v in feeds.items()}
        )
    np.testing.assert_allclose(
        got[mask.astype(bool)], ref.last_hidden_state.numpy()[mask.astype(bool)], atol=1e-4
    )


def test_modernbert_folder_exports_and_matches_torch(tmp_path):
    """ModernBERT (packed Wqkv, GeGLU, local attention every other layer) as an encoder type."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModel

    from tiny_models import save_tiny_hf

    hf_dir = save_tiny_hf("modernbert", tmp_path / "hf")
    path = export_model(hf_dir, tmp_path / "onnx")
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 900, (2, 40))  # longer than the local attention window (16)
    mask = (np.arange(40) < np.array([[40], [29]])).astype(np.int64)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        ["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})[0]
    with torch.no_grad():
        ref = AutoModel.from_pretrained(hf_dir)(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    keep = mask.astype(bool)
    np.testing.assert_allclose(got[keep], ref.last_hidden_state.numpy()[keep], atol=1e-4)


def test_fp16_export_is_half_precision_through_and_through(tmp_path):
    """--dtype fp16: float16 weights, inputs, outputs and KV cache, close to the float32 export."""
    import onnx

    from onnxpress.calibration import make_feeds
    from onnxpress.model_io import load_model
    from onnxpress.runtime import make_session, run_batches

    from tiny_models import save_tiny_hf

    hf_dir = save_tiny_hf("llama", tmp_path / "hf")
    fp32, fp16 = export_model(hf_dir, tmp_path / "fp32"), export_model(hf_dir, tmp_path / "fp16", dtype="fp16")
    proto = onnx.load(fp16)
    floats = {t.data_type for t in proto.graph.initializer if len(t.dims) >= 2 and t.data_type != onnx.TensorProto.INT64}
    assert floats == {onnx.TensorProto.FLOAT16}
    float_io = [v for v in [*proto.graph.input, *proto.graph.output] if v.type.tensor_type.elem_type not in (6, 7)]
    assert float_io and all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for v in float_io)
    ids = np.random.default_rng(0).integers(5, 900, (1, 10))
    ref, half = (run_batches(make_session(p), [make_feeds(load_model(p), ids, np.ones_like(ids))])[0]["logits"]
                 for p in (fp32, fp16))
    assert np.linalg.norm(half.astype(np.float32) - ref) <= 5e-3 * np.linalg.norm(ref)


def test_unknown_export_dtype_is_a_one_line_error(tmp_path):
    with pytest.raises(OnnxpressError, match="'bf16' is not one of fp32, fp16") as err:
        export_model("minilm", tmp_path / "out", dtype="bf16")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_tiny_decoder_export_has_kv_cache_and_greedy_matches_torch():
    import onnx_ir as ir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from onnxpress.evaluation import generate_greedy

    path = tiny_export("llama")
    graph = ir.load(path).graph
    inputs, outputs = [v.name for v in graph.inputs], [v.name for v in graph.outputs]
    assert outputs[0] == "logits"
    assert {"past_key_values.0.key", "past_key_values.1.value"} <= set(inputs)
    assert {"present.0.key", "present.1.value"} <= set(outputs)

    prompt = "The Congress of the United States"
    got = generate_greedy(path, path.parent, prompt, max_new_tokens=12)
    tok = AutoTokenizer.from_pretrained(tiny_hf_dir("llama"))
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = AutoModelForCausalLM.from_pretrained(tiny_hf_dir("llama")).generate(
            **enc, max_new_tokens=12, do_sample=False, pad_token_id=0
        )
    assert got == out[0, enc["input_ids"].shape[1] :].tolist()


def test_export_replaces_existing_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    path = export_model(tiny_hf_dir("bert"), out)
    assert path == out / "model.onnx" and path.exists()
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- real models ---------------------------------------------------------------------------------


@pytest.mark.real_model
def test_minilm_export_matches_sentence_transformers_weights():
    import torch
    from transformers import AutoModel, AutoTokenizer

    from onnxpress.evaluation import sentence_embeddings
    from onnxpress.export import minilm_hf_dir

    path = cached_export("minilm")
    sentences = ["The economy grew strongly last year.", "We will defend our nation."]
    got = sentence_embeddings(path, path.parent, sentences)
    tok = AutoTokenizer.from_pretrained(minilm_hf_dir())
    enc = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(minilm_hf_dir())(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None].float()
    ref = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4)


@pytest.mark.real_model
def test_smollm2_export_greedy_matches_hf_generate():
    import onnx_ir as ir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from onnxpress.evaluation import generate_greedy
    from onnxpress.export import smollm2_hf_dir

    path = cached_export("smollm2")
    graph = ir.load(path).graph
    outputs = [v.name for v in graph.outputs]
    assert outputs[0] == "logits" and sum(o.startswith("present.") for o in outputs) == 60

    prompt = "The state of the Union is"
    got = generate_greedy(path, path.parent, prompt, max_new_tokens=20)
    hf = smollm2_hf_dir()
    tok = AutoTokenizer.from_pretrained(hf)
    enc = tok(prompt, return_tensors="pt")
    assert enc["input_ids"][0, 0].item() != tok.bos_token_id  # GGUF metadata: no BOS added
    with torch.no_grad():
        out = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).generate(
            **enc, max_new_tokens=20, do_sample=False
        )
    assert got == out[0, enc["input_ids"].shape[1] :].tolist()
    assert len(got) == 20
