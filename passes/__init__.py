"""The compression passes, one module each; importing this package registers them."""

from onnxpress.passes import cleanup  # noqa: F401
from onnxpress.passes import prune_ffn, prune_heads  # noqa: F401
from onnxpress.passes import lowrank  # noqa: F401
from onnxpress.passes import attention  # noqa: F401
from onnxpress.passes import quantize  # noqa: F401
