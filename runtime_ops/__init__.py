"""onnxpress's own ONNX Runtime operator library (``libonnxpress_ops.so``).

Kernels: ``onnxpress.Attention`` (fused flash attention, CPU with AVX2, optional CUDA).
Build with ``python -m onnxpress.runtime_ops build``; sessions get the library through
:func:`register` or :func:`session_options_for`. Schema: runtime_ops/README.md.
"""

from .builder import build, find_built, library_api_version, library_has_cuda
from .headers import ort_include_dir
from .loader import (
    LIBRARY_ENV,
    installed_ort_api_version,
    library_path,
    register,
    session_options_for,
    uses_onnxpress_ops,
)
from .schema import (
    ATTENTION_INPUTS,
    ATTENTION_OP,
    ATTENTION_OUTPUTS,
    DOMAIN,
    DOMAIN_VERSION,
    make_attention_node,
    opset_import,
)

__all__ = [
    "ATTENTION_INPUTS",
    "ATTENTION_OP",
    "ATTENTION_OUTPUTS",
    "DOMAIN",
    "DOMAIN_VERSION",
    "LIBRARY_ENV",
    "build",
    "find_built",
    "installed_ort_api_version",
    "library_api_version",
    "library_has_cuda",
    "library_path",
    "make_attention_node",
    "opset_import",
    "ort_include_dir",
    "register",
    "session_options_for",
    "uses_onnxpress_ops",
]
