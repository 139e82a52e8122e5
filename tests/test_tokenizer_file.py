"""``tokenizer_file.TokenizerFile`` gives what transformers' AutoTokenizer gives on the same folder,
and folders whose config transformers applies on loading are left to transformers."""

import json
import shutil
import sys

import pytest

from onnxpress.datasets import load_tokenizer
from onnxpress.tokenizer_file import TokenizerFile, open_tokenizer_file

from tiny_models import tiny_model

TEXTS = ["Hello world, this is a TEST.", "The state of the Union is strong!  Isn't it?", "ünïcödé — 123", ""]


def _assert_same_as_transformers(folder):
    from transformers import AutoTokenizer

    ours, theirs = open_tokenizer_file(folder), AutoTokenizer.from_pretrained(str(folder))
    assert isinstance(ours, TokenizerFile)
    for settings in ({}, {"add_special_tokens": False}, {"truncation": True, "max_length": 5}):
        assert ours(TEXTS, **settings)["input_ids"] == theirs(TEXTS, **settings)["input_ids"], settings
        assert ours(TEXTS[1], **settings)["input_ids"] == theirs(TEXTS[1], **settings)["input_ids"], settings
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.all_special_ids == sorted(set(theirs.all_special_ids))
    assert len(ours) == len(theirs)
    ids = theirs(TEXTS[1])["input_ids"]
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_a_tiny_models_tokenizer_file_tokenizes_as_transformers_does(arch):
    _assert_same_as_transformers(tiny_model(arch).parent)


@pytest.mark.real_model
def test_minilm_and_smollm2_tokenizer_files_tokenize_as_transformers_does(minilm_onnx, smollm2_onnx):
    _assert_same_as_transformers(minilm_onnx.parent)
    _assert_same_as_transformers(smollm2_onnx.parent)


@pytest.mark.parametrize("flags", [{"tokenizer_class": "LlamaTokenizerFast"},  # adds BOS by default
                                   {"add_eos_token": True}, {"do_lower_case": True}, {"add_prefix_space": True}])
def test_a_config_transformers_would_apply_on_loading_leaves_the_folder_to_transformers(tmp_path, flags):
    folder = tmp_path / "tok"
    shutil.copytree(tiny_model("llama").parent, folder, ignore=shutil.ignore_patterns("*.onnx*"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config | flags))
    assert open_tokenizer_file(folder) is None
    assert type(load_tokenizer(folder)).__module__.startswith("transformers.")


def test_tokenizing_text_does_not_import_torch(tmp_path):
    """The point of reading the file with tokenizers alone: transformers would import torch."""
    import subprocess

    code = ("import sys; from onnxpress.datasets import load_tokenizer; "
            f"t = load_tokenizer({str(tiny_model('llama').parent)!r}); t(['a b'], truncation=True, max_length=4); "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
