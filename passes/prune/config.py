"""Settings shared by the head and FFN pruning passes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from onnxpress.pass_infra import PassConfig
from onnxpress.passes.prune.scoring import DEFAULT_RIDGE


@dataclass
class PruneConfig(PassConfig):
    """Settings shared by prune_heads and prune_ffn (each adds its ``target`` choices)."""

    fraction: float = 0.25  # share of the target (heads/neurons, parameters or MACs) to remove
    score: str = "contribution"  # "contribution" (calibrated, output-aware) | "weight_norm" (naive)
    allocation: str = "global"  # "global": per-layer counts differ | "uniform": same share per layer
    repair: bool = True  # refit the projection by ridge least squares on calibration data
    ridge: float = DEFAULT_RIDGE  # relative to the mean diagonal of X^T X
    add_bias: bool = True  # a refit may add a bias to a projection that had none (mean correction)
    max_batches: int = 0  # calibration batches to use (0: all)

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
        if self.allocation not in ("global", "uniform"):
            self.fail("allocation", f"must be 'global' or 'uniform'; got {self.allocation!r}")
        if not 0.0 <= self.ridge < 1.0:
            self.fail("ridge", f"must be in [0, 1), e.g. 1e-4; got {self.ridge}")
        if self.max_batches < 0:
            self.fail("max_batches", f"must be 0 (all) or a positive number of batches; got {self.max_batches}")
