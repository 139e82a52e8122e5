"""Decoder fusions ONNX Runtime's CPU kernels run fused: residual norms, rotary embeddings,
rotary inside the attention.

After attention fusion, a decoder layer still runs each residual Add apart from the RMSNorm
after it (itself six ops), and its rotary embedding as some twenty ops per query and key
(``Shape``/``Gather``/``Slice``/``Neg``/``Concat``/``Mul``/``Add``, the cos/sin computed from
``position_ids`` at every call), plus shape arithmetic and attention plumbing per layer. This
pass rewrites them with onnxscript's maintained ORT fusion rules
(``onnxscript.rewriter.ort_fusions``), and rules of ours where those do not reach:

* ``norms``: residual ``Add`` + RMSNorm -> ``com.microsoft.SkipSimplifiedLayerNormalization``
  (:mod:`.norms`: onnxscript's RMSNorm rule on the Add's sum; norms without a residual Add are
  left for ORT, which fuses them when it loads the model, written as ``Div`` by the root mean
  square for its fusion to match them);
* ``rotary``: the rotation -> ``com.microsoft.RotaryEmbedding`` reading cos/sin tables computed
  once, for ``max_positions`` positions (default: the model's ``max_position_embeddings``, from
  ``config.json`` beside it);
* ``rotary_into_attention``: a ``GroupQueryAttention``'s query and key rotations folded into it
  (``do_rotary``, positions from the cache length: see :mod:`.rotary` for when that is exact;
  the pass does not fold them when the data it is checked on counts positions otherwise).

The rules match shapes and spellings that exports leave implicit, so the graph is first put in
their form by exact rewrites (:mod:`.canonical`: static dims folded, reshape targets made
constant, ``Div(1, x)`` as ``Reciprocal``, shape reads moved to the tensor a dim comes from, so
every layer's batch / sequence / cache-length arithmetic becomes one copy), with shapes through
ORT's contrib ops (:mod:`.shapes`). A model where nothing fuses (an encoder, a LayerNorm
decoder without rotary) is left exactly as it was, with the reasons in the details.

It runs before quantization in the recipes. After activation quantization the rewrite, exact
in float, still moves a quantized activation by a rounding step here and there: the pass is
then checked against the error it measures, as a lossy pass is.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer
from onnxscript.rewriter import MatchingTracer, pattern
from onnxscript.rewriter.ort_fusions.rotary_embedding import partial_embedding_rules, rotary_embedding_rules

from onnxpress.analysis import find_norms
from onnxpress.analysis.graph_utils import data_consumers, is_constant, producer
from onnxpress.generation import config_context_length, read_json
from onnxpress.pass_infra import Outcome, Pass, PassConfig, register_pass
from onnxpress.passes.fuse.canonical import RULES as CANONICAL
from onnxpress.passes.fuse.canonical import spell_defaults
from onnxpress.passes.fuse.norms import ORT_NORM_SPELLING, SKIP_NORM_RULES
from onnxpress.passes.fuse.rotary import cos_sin_rules, into_attention_rules, uncounted_positions
from onnxpress.passes.fuse.shapes import infer_shapes

CANONICAL_ROUNDS = 4  # each round folds what the last one made constant; real exports settle in two
MAX_ROUNDS = 4  # fusion rounds: a round finds what the last one's shapes unblocked (exports seen: one)


@dataclass
class FuseConfig(PassConfig):
    norms: bool = True  # residual Add + RMSNorm -> com.microsoft.SkipSimplifiedLayerNormalization
    rotary: bool = True  # rotary embedding -> com.microsoft.RotaryEmbedding with cos/sin tables
    rotary_into_attention: bool = True  # ... and into the GroupQueryAttention reading it (do_rotary)
    # positions the cos/sin tables cover; 0: the model's max_position_embeddings (config.json)
    max_positions: int = 0

    def validate(self) -> None:
        if self.max_positions < 0:
            self.fail("max_positions", "must be >= 0 (0 = the model's max_position_embeddings), e.g. 8192")
        if self.rotary_into_attention and not self.rotary:
            self.fail("rotary_into_attention", "needs rotary: true (it folds the fused rotation)")


@register_pass
class FusePass(Pass):
    name = "fuse"
    config_class = FuseConfig
    lossless = True
    mapped_memory_multiple = 0.0  # rewires the graph; weights stay where they are

    def apply(self, model: ir.Model, ctx) -> Outcome:
        cfg: FuseConfig = self.config
        # exact in float; after activation quantization a changed rounding moves a quantized
        # activation by a step here and there, so the change is measured and reported instead
        self.lossless = not quantizes_activations(model)
        positions = cfg.max_positions or model_context_length(ctx.model_dir if ctx is not None else None)
        # folded into the attention, positions come from the cache length: only where the data
        # the stage is checked on counts them so (as generation, GenAI and our calibration do)
        uncounted = uncounted_positions(ctx.verification) if ctx is not None and cfg.rotary_into_attention else None
        outcome = fuse(model, norms=cfg.norms, rotary=cfg.rotary, max_positions=positions,
                       rotary_into_attention=cfg.rotary_into_attention and uncounted is None)
        if uncounted:
            outcome.details["notes"]["rotary into attention"] = f"not tried: {uncounted}"
        return outcome


# ops that round activations to integers at run time (MatMulNBits does with accuracy_level 4)
_ACTIVATION_QUANTIZERS = frozenset({"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
                                    "QuantizeLinear", "QLinearMatMul", "MatMulInteger"})


def quantizes_activations(model: ir.Model) -> bool:
    return any(n.op_type in _ACTIVATION_QUANTIZERS or (n.op_type == "MatMulNBits" and n.attributes.get_int(
        "accuracy_level", 0) == 4) for n in model.graph)


def model_context_length(model_dir: Path | None) -> int | None:
    """``max_position_embeddings`` from the ``config.json`` in ``model_dir``, if any."""
    return config_context_length(read_json(Path(model_dir) / "config.json")) if model_dir else None


def fuse(model: ir.Model, *, norms: bool = True, rotary: bool = True, rotary_into_attention: bool = True,
         max_positions: int | None = None) -> Outcome:
    """Rewrite ``model`` in place (the pass's work, callable without a compile context); it is
    left as it was when no fusion applies."""
    work = model.clone()
    before = _op_counts(work)
    counts: Counter = Counter(skip_norms_fused=0, rotary_fused=0, rotary_into_attention=0, norms_spelled_for_ort=0)
    notes: dict[str, object] = {}
    failures: list[str] = []  # why rotations were not folded into the attention
    table_failures: list[str] = []  # why rotations kept their computed cos/sin
    _canonicalize(work)
    # a fusion can give later layers the shapes the rules check (a rotation's output keeps its
    # input's batch dim, the decomposed one broadcast it away), so fuse until nothing changes
    for _ in range(MAX_ROUNDS):
        fused = -_count(work, "RotaryEmbedding")
        if rotary and max_positions:
            _apply(work, rotary_embedding_rules)
            _apply(work, cos_sin_rules(max_positions, table_failures))
            common.CommonSubexpressionEliminationPass()(work)  # one Slice per half, as the partial rule expects
            _apply(work, partial_embedding_rules)
            onnxscript.optimizer.inline(work)  # rotations whose tables did not fuse go back to plain ops
        fused += _count(work, "RotaryEmbedding")
        if norms:
            counts["skip_norms_fused"] += (n := _apply(work, SKIP_NORM_RULES))
            fused += n
        if rotary and rotary_into_attention:
            _canonicalize(work)  # moves shape reads off the rotated values the rule removes
            counts["rotary_into_attention"] += (n := _apply(work, into_attention_rules(failures)))
            fused += n
        if not fused:
            break
        _canonicalize(work)
    if rotary:
        counts["rotary_fused"] = _count(work, "RotaryEmbedding") + 2 * counts["rotary_into_attention"]
    notes.update(_leftovers(work, norms=norms, rotary=rotary, rotary_into_attention=rotary_into_attention,
                            max_positions=max_positions, failures=failures, table_failures=table_failures))
    details: dict[str, object] = {"notes": notes}
    if not any(counts.values()):
        details["unchanged"] = "nothing fused (see notes)"
        return Outcome(changes=dict.fromkeys(counts, 0), details=details)
    if norms:  # the norms left for ORT, in the spelling it fuses (the graph is kept from here on)
        counts["norms_spelled_for_ort"] = _apply(work, ORT_NORM_SPELLING)
    _finish(work)
    model.graph = work.graph
    after = _op_counts(model)
    counts["nodes_removed"] = sum(before.values()) - sum(after.values())
    details["removed_by_op"] = dict((before - after).most_common())
    details["added_by_op"] = dict((after - before).most_common())
    return Outcome(changes=dict(counts), details=details)


def _op_counts(model: ir.Model) -> Counter:
    """Nodes by op type, ``Constant`` nodes left out (ORT folds them into initializers)."""
    return Counter(n.op_type for n in model.graph if n.op_type != "Constant")


def _count(model: ir.Model, op_type: str) -> int:
    return sum(1 for n in model.graph if n.op_type == op_type and n.domain == "com.microsoft")


def _canonicalize(model: ir.Model) -> None:
    """``canonical.RULES`` and constant folding until the graph stops changing, shapes kept current."""
    infer_shapes(model)
    spell_defaults(model.graph)
    for _ in range(CANONICAL_ROUNDS):
        changed = CANONICAL.apply_to_model(model)
        onnxscript.optimizer.fold_constants(model)
        common.RemoveUnusedNodesPass()(model)
        infer_shapes(model)
        if not changed:
            break


def _apply(model: ir.Model, rules: pattern.RewriteRuleSet) -> int:
    count = rules.apply_to_model(model)
    if count:
        common.RemoveUnusedNodesPass()(model)
        infer_shapes(model)
    return count


def _leftovers(model: ir.Model, *, norms: bool, rotary: bool, rotary_into_attention: bool,
               max_positions: int | None, failures: list[str], table_failures: list[str]) -> dict[str, object]:
    """Why what is left unfused was left: the near-misses of the rules where its ops remain."""
    notes: dict[str, object] = {}
    graph = model.graph
    if norms:
        left = sum(1 for norm in find_norms(graph) if norm.kind == "RMSNorm" and _is_residual_sum(norm.input))
        if left:
            notes["skip norms"] = (f"{left} residual Adds left apart from the RMSNorm after them: "
                                   f"{_near_miss(model, SKIP_NORM_RULES)}")
    if rotary:
        halves = sum(1 for n in graph if n.op_type == "Neg" and any(c.op_type == "Concat" for c in data_consumers(
            n.outputs[0])))
        if not max_positions and halves:
            notes["rotary"] = ("not fused: the cos/sin tables need the model's context length; keep its config.json "
                               "beside the model or set max_positions")
        elif halves:
            why = "; ".join(sorted(set(table_failures))) or _near_miss(model, rotary_embedding_rules)
            notes["rotary"] = f"{halves} rotate-half left decomposed: {why}"
    if rotary and rotary_into_attention:
        apart = sum(1 for n in graph if n.op_type == "GroupQueryAttention" and not n.attributes.get_int("do_rotary", 0)
                    and any(_reads_rotary(v) for v in n.inputs[:2]))
        if apart:
            why = sorted(set(failures)) or ["the layout between the rotation and the attention is not "
                                            "Transpose + Reshape of a packed projection"]
            notes["rotary into attention"] = f"{apart} attention layers left rotating apart: {'; '.join(why)}"
    return notes


def _is_residual_sum(value: ir.Value) -> bool:
    node = producer(value)
    return node is not None and node.op_type == "Add" and not any(is_constant(v) for v in node.inputs)


def _reads_rotary(value: ir.Value | None, depth: int = 3) -> bool:
    node = producer(value)
    if node is None or depth == 0:
        return False
    return node.op_type == "RotaryEmbedding" or any(_reads_rotary(v, depth - 1) for v in node.inputs[:1])


def _near_miss(model: ir.Model, rules: pattern.RewriteRuleSet) -> str:
    """The failure of the rules' best partial match (onnxscript's tracer; it changes nothing)."""
    tracer = MatchingTracer()
    rules.apply_to_model(model, tracer=tracer)
    best = max((m for matches in tracer.best_matches_map.values() for m in matches), key=lambda m: m.score(),
               default=None)
    return best.match_result.reason if best is not None and best.match_result.reason else "no partial match"


def _finish(model: ir.Model) -> None:
    """Drop what the fusions left dead, merge the per-layer copies of the same computation, name
    the rotary tables, and write the small constants back as nodes (as cleanup leaves them)."""
    onnxscript.optimizer.fold_constants(model)
    _omit_unused_outputs(model.graph)
    common.CommonSubexpressionEliminationPass()(model)
    common.RemoveUnusedNodesPass()(model)
    common.RemoveUnusedFunctionsPass()(model)  # the rules' intermediate functions, and their domain
    common.RemoveUnusedOpsetsPass()(model)
    common.LiftConstantsToInitializersPass(size_limit=16)(model)
    _name_tables(model.graph)
    common.TopologicalSortPass()(model)
    infer_shapes(model)


def _omit_unused_outputs(graph: ir.Graph) -> None:
    """Leave the norms' unread optional outputs (mean, inverse std) unnamed, as ONNX omits an
    output, so the kernels do not write them."""
    for node in graph:
        if node.op_type == "SkipSimplifiedLayerNormalization":
            for out in node.outputs[1:3]:
                if not out.uses() and not out.is_graph_output():
                    out.name = ""


def _name_tables(graph: ir.Graph) -> None:
    """The cos/sin tables under names that say what they are (the rules name values val_N)."""
    slots = {"RotaryEmbedding": (2, 3), "GroupQueryAttention": (7, 8)}
    for node in graph:
        for slot, kind in zip(slots.get(node.op_type, ()), ("cos", "sin"), strict=False):
            table = node.inputs[slot] if slot < len(node.inputs) else None
            if table is not None and table.is_initializer() and not table.name.startswith("onnxpress_rotary"):
                name, n = f"onnxpress_rotary_{kind}", 1
                while name in graph.initializers:
                    name, n = f"onnxpress_rotary_{kind}_{n}", n + 1
                table.name = name  # renames the initializer
