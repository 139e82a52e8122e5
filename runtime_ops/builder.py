"""Configure and build the custom-op library with CMake into a content-addressed cache folder.

The folder name hashes the C++/CUDA sources and the ORT headers (which fix the API version),
so editing a kernel or switching headers triggers a rebuild and nothing else does.
"""

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort

from onnxpress.errors import OnnxpressError

from ._cache import cache_root
from .headers import ort_include_dir as _ort_include_dir

SOURCE_DIR = Path(__file__).resolve().parent
CPU_LIBRARY = "libonnxpress_ops.so"
CUDA_LIBRARY = "libonnxpress_ops_cuda.so"
BUILD_INFO = "build_info.json"
_SOURCE_GLOBS = ("CMakeLists.txt", "src/*", "cuda/*", "include/*")
# Optional override of the CUDA architectures compiled (CMake list, e.g. "90" or "80;90").
CUDA_ARCHS_ENV = "ONNXPRESS_CUDA_ARCHITECTURES"


def find_nvcc() -> str | None:
    """nvcc from ``$CUDACXX``, ``PATH`` or ``$CUDA_HOME``/``/usr/local/cuda``; None if absent."""
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(str(Path(home) / "bin" / "nvcc"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def cuda_ep_available() -> bool:
    return "CUDAExecutionProvider" in ort.get_available_providers()


def _want_cuda(cuda: bool | None) -> bool:
    """cuda=None: build the CUDA kernels only where they can run (nvcc and a CUDA-enabled onnxruntime)."""
    if cuda is None:
        return find_nvcc() is not None and cuda_ep_available()
    return cuda


def build_dir(ort_include: Path, cuda: bool) -> Path:
    digest = hashlib.sha256()
    for pattern in _SOURCE_GLOBS:
        for path in sorted(SOURCE_DIR.glob(pattern)):
            if path.is_file():
                digest.update(path.relative_to(SOURCE_DIR).as_posix().encode())
                digest.update(path.read_bytes())
    digest.update((ort_include / "onnxruntime_c_api.h").read_bytes())
    if cuda:
        digest.update(os.environ.get(CUDA_ARCHS_ENV, "").encode())
    return cache_root() / "ops" / f"{digest.hexdigest()[:16]}-{'cuda' if cuda else 'cpu'}"


def built_library(folder: Path, cuda: bool) -> Path:
    return folder / (CUDA_LIBRARY if cuda else CPU_LIBRARY)


def find_built(cuda: bool | None = None, ort_include_dir: str | os.PathLike | None = None) -> Path | None:
    """The already built library for the current sources, or None (never builds or downloads)."""
    with_cuda = _want_cuda(cuda)
    include = _ort_include_dir(ort_include_dir, fetch=False)
    if include is None:
        return None
    library = built_library(build_dir(include, with_cuda), with_cuda)
    return library if library.is_file() else None


def build(force: bool = False, ort_include_dir: str | os.PathLike | None = None, cuda: bool | None = None) -> Path:
    """Build (or reuse) the library and return the path of the .so to register.

    ``cuda=None`` adds the CUDA kernels when nvcc is found and onnxruntime has the CUDA EP;
    the result is then ``libonnxpress_ops_cuda.so`` (CPU + CUDA kernels), else ``libonnxpress_ops.so``.
    """
    with_cuda = _want_cuda(cuda)
    if with_cuda and find_nvcc() is None:
        raise OnnxpressError("cuda=True but nvcc was not found: install the CUDA toolkit or set CUDACXX")
    cmake = shutil.which("cmake")
    if cmake is None:
        raise OnnxpressError("cmake not found: install cmake >= 3.18 (apt-get install cmake or pip install cmake)")
    include = _ort_include_dir(ort_include_dir)
    folder = build_dir(include, with_cuda)
    library = built_library(folder, with_cuda)
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder.with_suffix(".lock")):
        if library.is_file() and not force:
            return library
        _run_cmake(cmake, include, folder, with_cuda)
        if not library.is_file():
            raise OnnxpressError(f"the build finished but {library} is missing: see {folder / 'build.log'}")
        info = {"ort_api_version": library_api_version(library), "cuda": with_cuda, "ort_include_dir": str(include)}
        (folder / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return library


def _run_cmake(cmake: str, include: Path, folder: Path, with_cuda: bool) -> None:
    tree = folder / "build"
    configure = [
        cmake, "-S", str(SOURCE_DIR), "-B", str(tree),
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DORT_INCLUDE_DIR={include}",
        f"-DONNXPRESS_CUDA={'ON' if with_cuda else 'OFF'}",
        f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={folder}",
    ]
    if with_cuda:
        configure.append(f"-DCMAKE_CUDA_COMPILER={find_nvcc()}")
        if archs := os.environ.get(CUDA_ARCHS_ENV):
            configure.append(f"-DONNXPRESS_CUDA_ARCHITECTURES={archs}")
    targets = ["onnxpress_ops"] + (["onnxpress_ops_cuda"] if with_cuda else [])
    compile_ = [cmake, "--build", str(tree), "--parallel", str(os.cpu_count() or 2), "--target", *targets]
    log_path = folder / "build.log"
    with open(log_path, "w") as log:
        for step in (configure, compile_):
            log.write("$ " + " ".join(step) + "\n")
            log.flush()
            result = subprocess.run(step, stdout=log, stderr=subprocess.STDOUT, text=True)
            if result.returncode != 0:
                break
    if result.returncode == 0:
        return
    output = log_path.read_text(errors="replace")
    print(output[-8000:], file=sys.stderr)  # the compiler output is only shown when something failed
    if "No CMAKE_CXX_COMPILER could be found" in output or "CMAKE_CXX_COMPILER not set" in output:
        raise OnnxpressError("no C++ compiler found: install g++ >= 9 or clang++ (or set CXX) and rebuild")
    hint = " or build without CUDA (cuda=False / --no-cuda)" if with_cuda else ""
    raise OnnxpressError(f"building the onnxpress ops library failed (full log: {log_path}): fix the error above{hint}")


@contextlib.contextmanager
def _locked(lock_path: Path):
    """Serialises concurrent builds of one folder (parallel test workers, several processes)."""
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def library_api_version(library: str | os.PathLike) -> int:
    """The OrtApi version *library* requests from ONNX Runtime (its ``OnnxpressOpsApiVersion()``)."""
    return int(_load(library).OnnxpressOpsApiVersion())


def library_has_cuda(library: str | os.PathLike) -> bool:
    return bool(_load(library).OnnxpressOpsHasCuda())


def _load(library: str | os.PathLike) -> ctypes.CDLL:
    # Safe to dlopen outside ORT: the library has no onnxruntime dependency and no static
    # initialisers that touch the ORT API.
    try:
        return ctypes.CDLL(str(library))
    except OSError as error:
        raise OnnxpressError(f"cannot load {library} ({error}): rebuild it with `python -m onnxpress.runtime_ops build`") from None
