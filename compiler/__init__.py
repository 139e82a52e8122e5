"""onnxpress: an ONNX graph-rewriting compiler that makes transformers smaller and faster without retraining."""

__version__ = "0.1.0"

from onnxpress.errors import OnnxpressError  # noqa: E402
from onnxpress.model_io import load_model, save_model  # noqa: E402

__all__ = ["OnnxpressError", "__version__", "compile_model", "load_model", "save_model"]


def compile_model(*args, **kwargs):
    """See ``onnxpress.compile.compile_model`` (imported lazily: it pulls in ONNX Runtime)."""
    from onnxpress.compile import compile_model as _compile

    return _compile(*args, **kwargs)
