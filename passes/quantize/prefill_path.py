"""Prompts and single tokens on different MatMulNBits kernels: the graph as an ``If`` on the
number of tokens in the call.

MLAS runs a 4-bit MatMulNBits with int8 activations (``accuracy_level`` 4) fastest at one
token and slower than float32 MatMul at a prompt's length; with float compute (level 0) it is
the other way round (``bench/bench_nbits_levels.py``; Intel Xeon with AVX-512 VNNI and AMX, 8
SmolLM2 MLP projections: level 4 0.32x float32's time at 1 token, 1.26x at 128; level 0 0.53x
and 0.97x). ONNX Runtime picks a kernel's compute type from the attribute alone, so a decoder
whose MatMulNBits all run at level 4 decodes fast and reads its prompt slowly. This pass keeps
the graph as it was for calls of up to ``max_decode_tokens`` tokens (batch x sequence: a
decode step) and runs a copy of its middle, its ``bits``-bit MatMulNBits at ``accuracy_level``,
for longer ones (a prompt):

    If(Size(input_ids) > max_decode_tokens, then: prompt copy, else: the nodes as they were)

The middle is the retargeted kernels and every node on a path between two of them; what runs
before the first (the embedding) and after the last (an int8 LM head) stays outside, once.
Both branches read the same initializers, so the file does not grow, but ONNX Runtime packs the
weights of each kernel node for itself, so a session holds the middle's weights packed twice
(SmolLM2 edge-int4: 171 -> 222 MiB after loading). A decode step runs the very kernels it ran
before, which the pass checks bit for bit; a prompt's outputs move by the difference between
the compute types, which the pass manager measures like any other lossy pass's. Which compute type reads prompts faster depends on the CPU, so by default (``when``
faster) the pass times a prompt through both graphs on the compiling host and splits only where
the copy is faster. It runs last: the passes before it rewrite a plain graph.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxpress.errors import OnnxpressError, first_line
from onnxpress.fidelity import compare_outputs
from onnxpress.model_io import session_model
from onnxpress.pass_infra import Outcome, Pass, PassConfig, register_pass
from onnxpress.runtime import make_session, run_batches, time_alternating

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
    # faster: split only if a prompt of ``probe_tokens`` tokens runs at least ``min_gain`` faster on
    # the prompt branch, timed on this host (which kernels win depends on the ISA: on an AMD EPYC
    # with AVX-512 VNNI level 4 prompts were already 0.70x-0.83x float32's time); always: split
    when: Literal["faster", "always"] = "faster"
    probe_tokens: int = 128
    min_gain: float = 0.05

    def validate(self) -> None:
        if self.max_decode_tokens < 1:
            self.fail("max_decode_tokens", f"must be a positive number of tokens, e.g. 32, got {self.max_decode_tokens}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            self.fail("accuracy_level", "must be 0 (float compute) to 4 (int8 activations)")
        if not self.bits or any(b not in (2, 4, 8) for b in self.bits):
            self.fail("bits", f"must list MatMulNBits weight widths among 2, 4 and 8, e.g. [4], got {self.bits}")
        if self.probe_tokens <= self.max_decode_tokens:
            self.fail("probe_tokens", f"must be more than max_decode_tokens ({self.max_decode_tokens}), e.g. 128")
        if not 0 <= self.min_gain < 1:
            self.fail("min_gain", f"must be in [0, 1), e.g. 0.05, got {self.min_gain}")


@register_pass
class PrefillPathPass(Pass):
    name = "prefill_path"
    config_class = PrefillPathConfig
    splits_graph = True
    memory_multiple = 3.0  # sessions of the graph before and after the split, and the verification's
    mapped_memory_multiple = 0.0  # rewires the graph; weights stay where they are

    def apply(self, model: ir.Model, ctx) -> Outcome:
        cfg: PrefillPathConfig = self.config
        split = functools.partial(split_prefill, max_decode_tokens=cfg.max_decode_tokens,
                                  accuracy_level=cfg.accuracy_level, bits=cfg.bits)
        trial = model.clone()  # weights shared: split and checked before the model is touched
        outcome = split(trial)
        if not outcome.modified:
            return outcome
        before = make_session(session_model(model), threads=ctx.threads)
        after = make_session(session_model(trial), threads=ctx.threads)
        batch = ctx.verification[0]
        short = [_first_sequence(batch, min(4, cfg.max_decode_tokens))]
        difference = compare_outputs(run_batches(before, short), run_batches(after, short)).max_abs
        if difference:
            raise OnnxpressError(f"prefill_path: the decode branch moved an output by {difference:.3g}; it must "
                                 "run exactly the graph it was given (a bug: please report it)")
        prompt = _first_sequence(batch, cfg.probe_tokens)
        try:
            seconds = time_alternating({"decode": lambda: before.run(None, prompt),
                                        "prompt": lambda: after.run(None, prompt)}, repeats=5, warmup=1)
        except Exception as exc:  # ORT raises several types; a prompt past the model's positions, say
            raise OnnxpressError(f"prefill_path: a {cfg.probe_tokens}-token prompt did not run ({first_line(exc)}): "
                                 "set probe_tokens within the model's context length") from None
        timing = {"probe_tokens": cfg.probe_tokens, "prompt_ms_decode_kernels": round(1e3 * seconds["decode"], 2),
                  "prompt_ms_prompt_kernels": round(1e3 * seconds["prompt"], 2)}
        if cfg.when == "faster" and seconds["prompt"] > (1 - cfg.min_gain) * seconds["decode"]:
            return Outcome(details={**timing, "note": f"prompts of {cfg.probe_tokens} tokens ran no more than "
                                    f"{cfg.min_gain:.0%} faster with accuracy_level {cfg.accuracy_level} on this "
                                    "host: the graph is left as it was"})
        outcome = split(model)
        outcome.details.update(timing, decode_step_max_abs_diff=difference)
        return outcome


def split_prefill(model: ir.Model, *, max_decode_tokens: int = 32, accuracy_level: int = 0,
                  bits: list[int] | tuple[int, ...] = (4,)) -> Outcome:
    """Rewrite ``model`` in place (the pass's work without a compile context); it is left as it
    was, with the reason in the details, when no kernel would change."""
    graph = model.graph
    if any(node.op_type == "If" for node in graph):
        return Outcome(details={"note": "the graph already picks its nodes by its inputs (If): left as it was"})
    retarget = [n for n in graph if _retargeted(n, accuracy_level, bits)]
    if not retarget:
        return Outcome(details={"note": f"no MatMulNBits of {'/'.join(map(str, bits))} bits at another "
                                        f"accuracy_level than {accuracy_level}: nothing to run differently"})
    tokens = next((v for v in graph.inputs if v.name == TOKEN_INPUT), None)
    if tokens is None:
        raise OnnxpressError(f"prefill_path: the model has no {TOKEN_INPUT!r} input to count tokens by; "
                             "leave the pass out for models that take embeddings")
    inside = _between(graph, retarget)
    nodes = [n for n in graph if n in inside]
    # values read from inside by the nodes after the If or as the graph's outputs: the If returns them
    crossing = list(dict.fromkeys(out for node in nodes for out in node.outputs if out.is_graph_output()
                                  or any(use.node not in inside for use in out.uses())))
    limit = ir.Value(name=LIMIT, const_value=ir.tensor(np.array(max_decode_tokens, np.int64)))
    graph.register_initializer(limit)
    size = ir.node("Size", [tokens], name="prefill_path_TokenCount")
    longer = ir.node("Greater", [size.outputs[0], limit], name="prefill_path_IsPrompt")
    size.outputs[0].name, longer.outputs[0].name = "prefill_path_tokens", "prefill_path_is_prompt"
    branch = ir.node("If", [longer.outputs[0]], num_outputs=len(crossing), name="prefill_path_If")
    for new, old in zip(branch.outputs, crossing, strict=True):
        new.name, new.type, new.shape = old.name, old.type, old.shape
        for use in list(old.uses()):
            if use.node not in inside:
                use.node.replace_input_with(use.idx, new)
        for i, out in enumerate(graph.outputs):
            if out is old:
                graph.outputs[i] = new
    graph.remove(nodes, safe=False)
    decode = ir.Graph([], crossing, nodes=nodes, name=f"{graph.name or 'main'}_{DECODE_BRANCH}")
    prompt = decode.clone(allow_outer_scope_values=True)
    prompt.name = f"{graph.name or 'main'}_{PROMPT_BRANCH}"
    for node in prompt:
        if _retargeted(node, accuracy_level, bits):
            node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", accuracy_level)
    for subgraph, prefix in ((prompt, PROMPT_BRANCH), (decode, DECODE_BRANCH)):
        _prefix_names(subgraph, prefix)
    branch.attributes["then_branch"] = ir.AttrGraph("then_branch", prompt)
    branch.attributes["else_branch"] = ir.AttrGraph("else_branch", decode)
    graph.extend([size, longer, branch])
    graph.sort()  # the If after what its branches read, before what reads it
    return Outcome(changes={"kernels_retargeted": len(retarget), "nodes_in_each_branch": len(nodes)},
                   details={"max_decode_tokens": max_decode_tokens, "prompt_accuracy_level": accuracy_level,
                            "nodes_outside": len(list(graph)) - 3})


def _between(graph: ir.Graph, retarget: list[ir.Node]) -> set[ir.Node]:
    """The retargeted nodes and every node on a path between two of them: what must run in each
    branch. The nodes before the first (embedding, masks) and after the last (the LM head) run
    once, outside, and keep one copy of their weights' packed form."""
    def reach(step) -> set[ir.Node]:
        seen, todo = set(retarget), list(retarget)
        while todo:
            for nxt in step(todo.pop()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    below = reach(lambda n: [use.node for out in n.outputs for use in out.uses()])
    above = reach(lambda n: [v.producer() for v in n.inputs if v is not None and v.producer() is not None])
    return below & above


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


def _first_sequence(batch: dict[str, np.ndarray], tokens: int) -> dict[str, np.ndarray]:
    """The batch's first sequence, its tokens cut or repeated to ``tokens``, all of them real
    (verification batches start with an empty KV cache: the cache inputs only lose their other
    sequences)."""
    feeds = {name: np.asarray(value)[:1] for name, value in batch.items()}
    ids = feeds[TOKEN_INPUT]
    feeds[TOKEN_INPUT] = np.resize(ids[0], (1, tokens)).astype(ids.dtype)
    for name, fill in (("attention_mask", np.ones(tokens)), ("position_ids", np.arange(tokens)),
                       ("token_type_ids", np.zeros(tokens))):
        if name in feeds:
            feeds[name] = fill[None].astype(feeds[name].dtype)
    return feeds
