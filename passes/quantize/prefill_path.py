"""Prompts and single tokens on different MatMulNBits kernels: the graph as an ``If`` on the
number of tokens in the call.

MLAS runs a 4-bit MatMulNBits with int8 activations (``accuracy_level`` 4) fastest at one
token and slower than float32 MatMul at a prompt's length; with float compute (level 0) it is
the other way round (``bench/bench_nbits_levels.py``; Intel Xeon with AVX-512 VNNI and AMX, 8
SmolLM2 MLP projections: level 4 0.32x float32's time at 1 token, 1.26x at 128; level 0 0.53x
and 0.97x). ONNX Runtime picks a kernel's compute type from the attribute alone, so a decoder
whose MatMulNBits all run at level 4 decodes fast and reads its prompt slowly. This pass keeps
the graph as it was for calls of up to ``max_decode_tokens`` tokens (batch x sequence: a
decode step) and runs a copy of it, its ``bits``-bit MatMulNBits at ``accuracy_level``, for
longer ones (a prompt):

    If(Size(input_ids) > max_decode_tokens, then: prompt copy, else: the graph as it was)

Both branches read the same initializers, so the file does not grow. A decode step runs the
very kernels it ran before, which the pass checks bit for bit; a prompt's outputs move by the
difference between the compute types, which the pass manager measures like any other lossy
pass's. It runs last: the passes before it rewrite a plain graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxpress.errors import OnnxpressError
from onnxpress.model_io import SessionModel, session_model
from onnxpress.pass_infra import Outcome, Pass, PassConfig, register_pass
from onnxpress.runtime import make_session

TOKEN_INPUT = "input_ids"
PROMPT_BRANCH, DECODE_BRANCH = "prompt", "decode"
LIMIT = "prefill_path_max_decode_tokens"  # the initializer the If's condition compares with


@dataclass
class PrefillPathConfig(PassConfig):
    # calls of more tokens than this (batch x sequence) take the prompt branch; MLAS's int8
    # kernels were faster up to 32 rows and float compute from 64 (bench/bench_nbits_levels.py)
    max_decode_tokens: int = 32
    accuracy_level: int = 0  # the prompt branch's MatMulNBits compute type (0: float)
    bits: list[int] = field(default_factory=lambda: [4])  # which MatMulNBits change in the prompt branch

    def validate(self) -> None:
        if self.max_decode_tokens < 1:
            self.fail("max_decode_tokens", f"must be a positive number of tokens, e.g. 32, got {self.max_decode_tokens}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            self.fail("accuracy_level", "must be 0 (float compute) to 4 (int8 activations)")
        if not self.bits or any(b not in (2, 4, 8) for b in self.bits):
            self.fail("bits", f"must list MatMulNBits weight widths among 2, 4 and 8, e.g. [4], got {self.bits}")


@register_pass
class PrefillPathPass(Pass):
    name = "prefill_path"
    config_class = PrefillPathConfig
    mapped_memory_multiple = 0.0  # rewires the graph; weights stay where they are

    def apply(self, model: ir.Model, ctx) -> Outcome:
        cfg: PrefillPathConfig = self.config
        before = session_model(model)  # the graph as it was, for the decode-step check
        outcome = split_prefill(model, max_decode_tokens=cfg.max_decode_tokens, accuracy_level=cfg.accuracy_level,
                                bits=cfg.bits)
        if outcome.modified:
            outcome.details["decode_step_max_abs_diff"] = decode_step_difference(before, model, ctx,
                                                                                 min(4, cfg.max_decode_tokens))
        return outcome


def split_prefill(model: ir.Model, *, max_decode_tokens: int = 32, accuracy_level: int = 0,
                  bits: list[int] | tuple[int, ...] = (4,)) -> Outcome:
    """Rewrite ``model`` in place (the pass's work without a compile context); it is left as it
    was, with the reason in the details, when no kernel would change."""
    graph = model.graph
    retarget = [n for n in graph if _retargeted(n, accuracy_level, bits)]
    if is_split(model):
        return Outcome(details={"note": "the graph already takes prompts and decode steps apart"})
    if not retarget:
        return Outcome(details={"note": f"no MatMulNBits of {'/'.join(map(str, bits))} bits at another "
                                        f"accuracy_level than {accuracy_level}: nothing to run differently"})
    tokens = next((v for v in graph.inputs if v.name == TOKEN_INPUT), None)
    if tokens is None:
        raise OnnxpressError(f"prefill_path: the model has no {TOKEN_INPUT!r} input to count tokens by; "
                             "leave the pass out for models that take embeddings")
    nodes = list(graph)
    outputs = list(graph.outputs)
    graph.remove(nodes, safe=False)
    graph.outputs.clear()
    decode = ir.Graph([], outputs, nodes=nodes, name=f"{graph.name or 'main'}_{DECODE_BRANCH}")
    prompt = decode.clone(allow_outer_scope_values=True)
    prompt.name = f"{graph.name or 'main'}_{PROMPT_BRANCH}"
    for node in prompt:
        if _retargeted(node, accuracy_level, bits):
            node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", accuracy_level)
    for branch, prefix in ((prompt, PROMPT_BRANCH), (decode, DECODE_BRANCH)):
        _prefix_names(branch, prefix)

    limit = ir.Value(name=LIMIT, const_value=ir.tensor(np.array(max_decode_tokens, np.int64)))
    graph.register_initializer(limit)
    size = ir.node("Size", [tokens], name="prefill_path_TokenCount")
    longer = ir.node("Greater", [size.outputs[0], limit], name="prefill_path_IsPrompt")
    size.outputs[0].name, longer.outputs[0].name = "prefill_path_tokens", "prefill_path_is_prompt"
    branch = ir.node("If", [longer.outputs[0]], {"then_branch": prompt, "else_branch": decode},
                     num_outputs=len(outputs), name="prefill_path_If")
    for new, old in zip(branch.outputs, outputs, strict=True):
        new.name = old.name.removeprefix(f"{DECODE_BRANCH}/")
        new.type, new.shape = old.type, old.shape
    graph.extend([size, longer, branch])
    graph.outputs.extend(branch.outputs)
    return Outcome(changes={"kernels_retargeted": len(retarget), "nodes_in_each_branch": len(nodes)},
                   details={"max_decode_tokens": max_decode_tokens, "prompt_accuracy_level": accuracy_level})


def is_split(model: ir.Model) -> bool:
    """Whether ``model``'s graph is already one prompt / decode ``If``."""
    return any(node.op_type == "If" and node.name == "prefill_path_If" for node in model.graph)


def _retargeted(node: ir.Node, accuracy_level: int, bits) -> bool:
    return (node.op_type == "MatMulNBits" and node.domain == "com.microsoft"
            and node.attributes.get_int("bits", 4) in bits
            and node.attributes.get_int("accuracy_level", 0) != accuracy_level)


def _prefix_names(branch: ir.Graph, prefix: str) -> None:
    """Value and node names unique across the model: each branch's under its own prefix."""
    for node in branch:
        if node.name:
            node.name = f"{prefix}/{node.name}"
        for out in node.outputs:
            if out.name:
                out.name = f"{prefix}/{out.name}"


def decode_step_difference(before: SessionModel, after: ir.Model, ctx, tokens: int) -> float:
    """Largest |difference| of any output between the graph before the split and its decode
    branch, on the first sequence of the verification data cut to a few tokens; the branch runs
    the same kernels, so anything but 0 is a bug."""
    old, new = make_session(before, threads=ctx.threads), make_session(after, threads=ctx.threads)
    feeds = _short_feeds(ctx.verification[0], tokens)
    worst = 0.0
    for a, b in zip(old.run(None, feeds), new.run(None, feeds), strict=True):
        worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0)))
    if worst:
        raise OnnxpressError(f"prefill_path: the decode branch moved an output by {worst:.3g}; it must run "
                             "exactly the graph it was given (a bug: please report it)")
    return worst


def _short_feeds(batch: dict[str, np.ndarray], tokens: int) -> dict[str, np.ndarray]:
    """The batch's first sequence cut to ``tokens`` tokens (verification batches start with an
    empty KV cache, so the cache inputs only lose their other sequences)."""
    feeds = {name: np.asarray(value)[:1] for name, value in batch.items()}
    for name in (TOKEN_INPUT, "attention_mask", "position_ids", "token_type_ids"):
        if name in feeds:
            feeds[name] = feeds[name][:, :tokens]
    return feeds
