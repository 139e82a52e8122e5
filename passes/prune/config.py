"""Settings shared by the head and FFN pruning passes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from onnxpress.pass_infra import PassConfig
from onnxpress.passes.prune.scoring import DEFAULT_RIDGE

ALLOCATIONS = ("auto", "probe", "global", "uniform")


@dataclass
class PruneConfig(PassConfig):
    """Settings shared by prune_heads and prune_ffn (each adds its ``target`` choices)."""

    fraction: float = 0.25  # share of the target (heads/neurons, parameters or MACs) to remove
    score: str = "contribution"  # "contribution" (calibrated, output-aware) | "weight_norm" (naive)
    # how many groups each layer loses. "probe": by the model's output loss measured with each layer
    # (a bucket of layers in deep models) pruned alone; "global": by each layer's own repaired error
    # relative to its residual stream, a proxy that needs no probes; "uniform": the same share
    # everywhere; "auto": probe, but global for decoders (see scoring.allocation_for)
    allocation: str = "auto"
    # calibration sequences each probe runs, set apart from those the orders and the probes' refits
    # are fitted on (scoring.calibration_stats). While the probes still ran on the fitted sequences,
    # 8 or 32 misled MiniLM's head allocation (BBC News cosine 0.917 / 0.915), 64 and 128 did not
    # (0.947 / 0.943)
    probe_samples: int = 64
    # share of the calibration's real tokens replaced by random vocabulary tokens (where the compile
    # has a tokenizer) for the statistics and the probes: what the choice and the refit fit then
    # also holds beyond the calibration text's words (prune_ffn's default: see PruneFfnConfig)
    augment: float = 0.0
    repair: bool = True  # refit the projection by ridge least squares on calibration data
    ridge: float = DEFAULT_RIDGE  # relative to the mean diagonal of X^T X
    add_bias: bool = True  # a refit may add a bias to a projection that had none (mean correction)
    max_batches: int = 0  # calibration batches of 8 samples to use (0: all)

    targets: ClassVar[tuple[str, ...]] = ("params", "macs")
    scores: ClassVar[tuple[str, ...]] = ("contribution", "weight_norm")
    target: str = "params"

    def validate(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            self.fail("fraction", f"must be in [0, 1), e.g. 0.25; got {self.fraction}")
        if self.target not in self.targets:
            self.fail("target", f"must be one of {', '.join(self.targets)}; got {self.target!r}")
        if self.score not in self.scores:
            self.fail("score", f"must be one of {', '.join(self.scores)}; got {self.score!r}")
        if self.allocation not in ALLOCATIONS:
            self.fail("allocation", f"must be one of {', '.join(ALLOCATIONS)}; got {self.allocation!r}")
        if self.probe_samples < 1:
            self.fail("probe_samples", f"must be a positive number of sequences, got {self.probe_samples}")
        if not 0.0 <= self.augment < 1.0:
            self.fail("augment", f"must be in [0, 1), e.g. 0.15; got {self.augment}")
        if not 0.0 <= self.ridge < 1.0:
            self.fail("ridge", f"must be in [0, 1), e.g. 1e-4; got {self.ridge}")
        if self.max_batches < 0:
            self.fail("max_batches", f"must be 0 (all) or a positive number of batches; got {self.max_batches}")
