"""The compression passes, one subpackage per family; importing this package registers them."""

from onnxpress.passes import (  # noqa: F401
    attention,
    cleanup,
    distill,
    fuse,
    lowrank,
    prune,
    quantize,
    share_weights,
)
