"""Lossless cleanup: constant folding, dead nodes and unused initializers.

Done with onnxscript's optimizer (constant folding + dead-code removal) and a sequence
of onnx-ir's common passes; counts what went away.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer

from onnxpress.pass_infra import Outcome, Pass, PassConfig, register_pass


@dataclass
class CleanupConfig(PassConfig):
    fold_constants: bool = True
    # Folding may materialise large tensors (e.g. an expanded mask); skip those.
    max_folded_size: int = 1 << 20
    deduplicate_initializers: bool = True


@register_pass
class CleanupPass(Pass):
    name = "cleanup"
    config_class = CleanupConfig
    lossless = True
    mapped_memory_multiple = 0.0  # rewires the graph; weights stay where they are

    def apply(self, model: ir.Model, ctx) -> Outcome:
        cfg: CleanupConfig = self.config
        nodes_before = Counter(n.op_type for n in model.graph)
        inits_before = len(model.graph.initializers)
        if cfg.fold_constants:
            onnxscript.optimizer.fold_constants(model, output_size_limit=cfg.max_folded_size)
        dedupe = [common.DeduplicateInitializersPass()] if cfg.deduplicate_initializers else []
        ir.passes.Sequential(
            common.IdentityEliminationPass(),
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.RemoveUnusedOpsetsPass(),
            *dedupe,
            common.LiftConstantsToInitializersPass(size_limit=16),
            common.RemoveUnusedNodesPass(),
        )(model)
        nodes_after = Counter(n.op_type for n in model.graph)
        removed = nodes_before - nodes_after
        return Outcome(
            changes={
                "nodes_removed": sum(removed.values()),
                "initializers_removed": max(0, inits_before - len(model.graph.initializers)),
            },
            details={"removed_by_op": dict(removed.most_common())},
        )
