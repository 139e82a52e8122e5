"""ONNX Runtime C/C++ API headers for building the custom-op library.

The onnxruntime wheel ships no headers. Unless the user points at a folder
(``ONNXPRESS_ORT_INCLUDE_DIR``), we take the ORT 1.17 headers that the ``amd-quark==0.13``
wheel vendors: the wheel is only downloaded and unzipped, never installed (its pins clash).
"""

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from onnxpress.errors import OnnxpressError

from ._cache import cache_root

HEADER_ORT_VERSION = "1.17.0"
QUARK_REQUIREMENT = "amd-quark==0.13"
_QUARK_HEADER_DIR = (
    f"quark/onnx/operators/custom_ops/include/onnxruntime-{HEADER_ORT_VERSION}/onnxruntime/core/session/"
)
_REQUIRED = ("onnxruntime_c_api.h", "onnxruntime_cxx_api.h", "onnxruntime_cxx_inline.h")


def ort_include_dir(explicit: str | os.PathLike | None = None, fetch: bool = True) -> Path | None:
    """Folder holding ``onnxruntime_cxx_api.h``: *explicit*, else ``$ONNXPRESS_ORT_INCLUDE_DIR``,
    else the cached ORT 1.17 headers, downloaded on first use (None if absent and not *fetch*)."""
    given = explicit or os.environ.get("ONNXPRESS_ORT_INCLUDE_DIR")
    if given:
        return _find_header_folder(Path(given).expanduser())
    cached = cache_root() / "ort-headers" / HEADER_ORT_VERSION
    if all((cached / name).is_file() for name in _REQUIRED):
        return cached
    if not fetch:
        return None
    _fetch_quark_headers(cached)
    return cached


def _find_header_folder(root: Path) -> Path:
    for folder in (root, root / "onnxruntime" / "core" / "session", root / "include"):
        if all((folder / name).is_file() for name in _REQUIRED):
            return folder
    raise OnnxpressError(
        f"no ONNX Runtime headers (onnxruntime_cxx_api.h) in {root}: point ONNXPRESS_ORT_INCLUDE_DIR "
        "at the include folder of an onnxruntime >= 1.17 release, or unset it to download them"
    )


def _fetch_quark_headers(target: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="onnxpress-headers-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   QUARK_REQUIREMENT, "-d", tmp, "--quiet"]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("amd_quark-*.whl"))
        if result.returncode != 0 or not wheels:
            reason = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise OnnxpressError(
                f"could not download {QUARK_REQUIREMENT} for the ORT {HEADER_ORT_VERSION} C++ headers ({reason}): "
                "check access to PyPI or set ONNXPRESS_ORT_INCLUDE_DIR to a folder with onnxruntime_cxx_api.h"
            )
        staging = Path(tempfile.mkdtemp(prefix=".headers-", dir=_ensure_dir(target.parent)))
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                names = [n for n in wheel.namelist() if n.startswith(_QUARK_HEADER_DIR) and n.endswith(".h")]
                for name in names:
                    (staging / name[len(_QUARK_HEADER_DIR):]).write_bytes(wheel.read(name))
            if not all((staging / name).is_file() for name in _REQUIRED):
                raise OnnxpressError(
                    f"{wheels[0].name} does not contain the ORT {HEADER_ORT_VERSION} headers any more: "
                    "set ONNXPRESS_ORT_INCLUDE_DIR to a folder with onnxruntime_cxx_api.h"
                )
            try:
                staging.rename(target)  # atomic: a concurrent fetch either wins or finds it done
            except OSError:
                if not (target / "onnxruntime_cxx_api.h").is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
