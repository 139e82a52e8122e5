"""Fixtures for the onnxpress ops library tests: one CPU build per test session."""

import onnxruntime as ort
import pytest

from onnxpress.runtime_ops import build, register


@pytest.fixture(scope="session")
def ops_library():
    """The CPU library, built once (reused from the cache when the sources did not change)."""
    return build(cuda=False)


@pytest.fixture
def make_session(ops_library):
    """make_session(model, provider="CPUExecutionProvider", library=None) -> InferenceSession."""

    def make(model, provider="CPUExecutionProvider", library=None):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        register(options, library=library or ops_library)
        return ort.InferenceSession(model.SerializeToString(), options, providers=[provider])

    return make
