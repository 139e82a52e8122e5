"""Where onnxpress keeps downloaded headers and built libraries."""

import os
from pathlib import Path


def cache_root() -> Path:
    """``$ONNXPRESS_CACHE_DIR``, else ``$XDG_CACHE_HOME/onnxpress``, else ``~/.cache/onnxpress``."""
    if explicit := os.environ.get("ONNXPRESS_CACHE_DIR"):
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "onnxpress"
