"""The compression passes, one module each; importing this package registers them."""

from onnxpress.passes import (  # noqa: F401
    attention,
    cleanup,
    lowrank,
    prune_ffn,
    prune_heads,
    quantize,
    share_weights,
)
