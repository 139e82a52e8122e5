"""Structured pruning: attention heads (``prune_heads``) and FFN neurons (``prune_ffn``).

Both remove groups of input features of one projection -- the attention output
projection (a head, or a KV group of heads) or the FFN down projection (a neuron) --
with whatever produces them upstream, chosen on calibration data and globally across
layers, then refit that projection by ridge least squares (:mod:`.scoring`); the graph
edits are in :mod:`.rewrite`.
"""

from onnxpress.passes.prune.ffn import PruneFfnPass
from onnxpress.passes.prune.heads import PruneHeadsPass

__all__ = ["PruneFfnPass", "PruneHeadsPass"]
