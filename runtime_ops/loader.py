"""Finding and registering the library with onnxruntime sessions."""

import os
from pathlib import Path

import onnx
import onnxruntime as ort

from onnxpress.errors import OnnxpressError

from .builder import build, cuda_ep_available, find_built, find_nvcc, library_api_version
from .schema import DOMAIN

LIBRARY_ENV = "ONNXPRESS_OPS_LIB"
# Marks SessionOptions that already carry the library: registering the domain twice makes
# session creation fail with "Domain already set in registry".
_REGISTERED_KEY = "onnxpress.ops_library"


def library_path(build_if_missing: bool = True, cuda: bool | None = None) -> Path:
    """Path of the ops library: ``$ONNXPRESS_OPS_LIB`` if set, else the cached build (built now if
    missing and *build_if_missing*). ``cuda=None`` picks the CUDA build when this onnxruntime has
    the CUDA EP and nvcc is available."""
    if override := os.environ.get(LIBRARY_ENV):
        path = Path(override).expanduser()
        if not path.is_file():
            raise OnnxpressError(f"{LIBRARY_ENV}={override} does not exist: fix the path or unset {LIBRARY_ENV}")
        return path
    if (found := find_built(cuda)) is not None:
        return found
    if not build_if_missing:
        raise OnnxpressError("the onnxpress ops library is not built: run `python -m onnxpress.runtime_ops build`")
    return build(cuda=cuda)


def installed_ort_api_version() -> int:
    """Highest OrtApi version this onnxruntime provides (ORT 1.N serves API versions 1..N)."""
    major, minor = (int(part) for part in ort.__version__.split(".")[:2])
    return minor if major == 1 else 10_000


def register(session_options: ort.SessionOptions, library: str | os.PathLike | None = None) -> ort.SessionOptions:
    """Registers the onnxpress ops library with *session_options* (idempotent) and returns them."""
    try:
        already = session_options.get_session_config_entry(_REGISTERED_KEY)
    except RuntimeError:  # no such entry yet
        already = None
    if already:
        return session_options
    path = Path(library) if library is not None else library_path()
    if not path.is_file():
        raise OnnxpressError(f"onnxpress ops library {path} is missing: run `python -m onnxpress.runtime_ops build`")
    needed, available = library_api_version(path), installed_ort_api_version()
    if needed > available:
        raise OnnxpressError(
            f"{path.name} was built for ONNX Runtime API {needed} but onnxruntime {ort.__version__} provides "
            f"up to {available}: upgrade onnxruntime to >= 1.{needed} or rebuild against older headers"
        )
    session_options.register_custom_ops_library(str(path))
    session_options.add_session_config_entry(_REGISTERED_KEY, str(path))
    return session_options


def uses_onnxpress_ops(model) -> bool:
    """True if any node (subgraphs and functions included) is in the ``onnxpress`` domain.

    *model*: onnx.ModelProto, onnx_ir.Model, serialized bytes or a path (external data is not read).
    """
    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(os.fspath(model), load_external_data=False)
    elif isinstance(model, (bytes, bytearray, memoryview)):
        model = onnx.load_from_string(bytes(model))
    if isinstance(model, onnx.ModelProto):
        graphs = [model.graph]
        if any(n.domain == DOMAIN for f in model.functions for n in f.node):
            return True
        while graphs:
            graph = graphs.pop()
            for node in graph.node:
                if node.domain == DOMAIN:
                    return True
                for attribute in node.attribute:
                    graphs.extend([attribute.g] if attribute.HasField("g") else [])
                    graphs.extend(attribute.graphs)
        return False
    import onnx_ir

    if isinstance(model, onnx_ir.Model):
        nodes = list(onnx_ir.traversal.RecursiveGraphIterator(model.graph))
        for function in model.functions.values():
            nodes.extend(onnx_ir.traversal.RecursiveGraphIterator(function))
        return any(node.domain == DOMAIN for node in nodes)
    raise TypeError(f"uses_onnxpress_ops: expected a model, bytes or a path, got {type(model).__name__}")


def session_options_for(model, base: ort.SessionOptions | None = None) -> ort.SessionOptions:
    """*base* (or new SessionOptions) with the ops library registered when *model* needs it."""
    options = base if base is not None else ort.SessionOptions()
    if uses_onnxpress_ops(model):
        register(options)
    return options


__all__ = [
    "LIBRARY_ENV",
    "cuda_ep_available",
    "find_nvcc",
    "installed_ort_api_version",
    "library_path",
    "register",
    "session_options_for",
    "uses_onnxpress_ops",
]
