"""Shared test setup: offline Hugging Face, ``tests/`` importable, real-model fixtures.

The real models (MiniLM, SmolLM2-135M) ship with pip packages; ``minilm_onnx`` and
``smollm2_onnx`` export them once with ``onnxpress.export.cached_export`` into
``~/.cache/onnxpress/onnx/`` and return the ``model.onnx`` path. A missing package is a
failure, never a skip. Tests using them are marked ``real_model``.
"""

from __future__ import annotations

import os
import sys
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


def export_minilm() -> Path:
    """all-MiniLM-L6-v2 (6 layers, 12 heads x 32, FFN 1536), exported once by onnxpress.export."""
    from onnxpress.export import cached_export

    return cached_export("minilm")


def export_smollm2() -> Path:
    """SmolLM2-135M-Instruct (30 layers, 9 heads / 3 KV heads x 64, FFN 1536) from the packaged
    GGUF, exported once with its KV cache by onnxpress.export."""
    from onnxpress.export import cached_export

    return cached_export("smollm2")


@pytest.fixture(scope="session")
def minilm_onnx() -> Path:
    return export_minilm()


@pytest.fixture(scope="session")
def smollm2_onnx() -> Path:
    return export_smollm2()
