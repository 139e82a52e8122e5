"""The compression passes, one module each; importing this package registers them."""

from onnxpress.passes import cleanup  # noqa: F401
