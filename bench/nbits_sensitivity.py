"""Where a decoder's int4 loss comes from: the next-token loss increase when one group of
MatMuls (a role, the LM head among them; a role in a range of layers; everything but one
group; or the LM head's vocabulary rows from some token id on) is rounded to ``--bits`` in
blocks of ``--block`` (round to nearest with the pass's range search, no GPTQ) and the rest
stays float.

    python bench/nbits_sensitivity.py [--model smollm2] [--windows 6] [--bits 4] [--block 32]

Measured on windows of the calibration split (SOTU before 1950), never the evaluation text;
one ONNX Runtime session whose MatMul weights are overridable inputs, so each trial feeds
its rounded weights. Prints a table (a trial moves the loss by about +-0.003 on noise alone
at 6 x 256 tokens): what the ``outer_roles`` setting of the quantize pass and the
``edge-int4`` recipe was chosen from, and how the LM head's loss lies along its vocabulary
(the pass's ``lm_head_int8_rows``). It ranks groups under round to nearest only, which does not
carry over to GPTQ: q/k/v in blocks of 64 rate no worse than in blocks of 32 here, yet
``edge-int4`` with a first quantize pass taking q/k/v at ``block_size: 64`` measured +8.54% BBC
News perplexity against the recipe's +6.48% (SmolLM2, bench_decode's 16 windows, 32-token steps).
"""

from __future__ import annotations

import argparse
import re

import numpy as np
import onnx

from onnxpress import datasets
from onnxpress.analysis import analyze
from onnxpress.calibration import make_feeds
from onnxpress.evaluation import perplexity_windows
from onnxpress.export import cached_export
from onnxpress.fidelity import next_token_nll
from onnxpress.model_io import load_model
from onnxpress.passes.quantize.graph import find_linears
from onnxpress.passes.quantize.weight_only import quantize_nbits
from onnxpress.runtime import make_session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--block", type=int, default=32)
    args = parser.parse_args()

    src = cached_export(args.model)
    model = load_model(src)
    linears, _ = find_linears(model, analyze(model), transposed=True)
    del model
    where = {lin.weight.name: (lin.role, lin.layer) for lin in linears
             if lin.layer is not None or (lin.role == "lm_head" and not lin.transposed)}
    proto = onnx.load(src)
    stored = {t.name: t for t in proto.graph.initializer}
    tied = set()  # tables read as [N, K] by a tied head: rounded in blocks along K, as the head's codes
    for node in proto.graph.node:
        # a tied LM head reads the embedding table through a Transpose: it gets a copy of the table
        # of its own, so rounding the head leaves the embedding Gather alone
        if node.op_type == "Transpose" and node.output[0] in {lin.weight.name for lin in linears if lin.transposed}:
            copy = onnx.TensorProto()
            copy.CopyFrom(stored[node.input[0]])
            copy.name = node.input[0] = f"{copy.name}_lm_head"
            proto.graph.initializer.append(copy)
            where[copy.name] = ("lm_head", None)
            tied.add(copy.name)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.name in where}
    for name, w in weights.items():  # overridable initializers: one session serves every trial
        proto.graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(w.shape)))
    session = make_session(proto.SerializeToString(), threads=2)
    del proto
    ids = perplexity_windows(src.parent, datasets.corpus_files("sotu", "calibration"), window=args.window,
                             max_windows=args.windows)
    feeds = {k: v for k, v in make_feeds(session, ids, np.ones_like(ids)).items() if k not in weights}
    rounded = {}
    for name, w in weights.items():
        deq = quantize_nbits(w.T if name in tied else w, args.bits, args.block).dequantized
        rounded[name] = np.ascontiguousarray(deq.T if name in tied else deq)

    def loss(chosen, overrides=None) -> float:
        logits = session.run(["logits"], {**feeds, **{n: rounded[n] for n in chosen}, **(overrides or {})})[0]
        return next_token_nll([{"logits": logits}], [feeds])[0]

    def head_from_row(name: str, row: int) -> np.ndarray:
        """The LM head with its vocabulary rows from ``row`` on rounded, the earlier ones float."""
        mixed = weights[name].copy()
        if name in tied:  # [vocabulary, K]
            mixed[row:] = rounded[name][row:]
        else:  # [K, vocabulary]
            mixed[:, row:] = rounded[name][:, row:]
        return mixed

    base = loss([])
    layers = 1 + max(layer for _, layer in where.values() if layer is not None)
    roles = sorted({role for role, _ in where.values()}, key=lambda r: re.sub("qkv", "q", r))
    trials = [("every MatMul", lambda r, i: True)]
    trials += [(f"{role}", lambda r, i, role=role: r == role) for role in roles]
    step = max(1, layers // 6)
    trials += [(f"{role} layers {lo}-{min(lo + step, layers) - 1}",
                lambda r, i, role=role, lo=lo: r == role and i is not None and lo <= i < lo + step)
               for role in ("down", "up", "q") if role in roles for lo in range(0, layers, step)]
    trials += [(f"all but down in the first and last {k}",
                lambda r, i, k=k: not (r == "down" and (i < k or i >= layers - k)))
               for k in (2, 3, 4)]
    print(f"{args.model}: next-token loss {base:.4f} on {len(ids)} x {args.window} calibration tokens; "
          f"increase with int{args.bits} blocks of {args.block} (no GPTQ) on:")
    for label, pick in trials:
        chosen = [n for n, (role, layer) in where.items() if pick(role, layer)]
        print(f"  {label:40s} {len(chosen):4d} MatMuls  {loss(chosen) - base:+.4f}")
    # byte-level BPE vocabularies number tokens commonest first: how much of the head's loss its
    # first rows carry (the quantize pass's lm_head_int8_rows)
    for name in (n for n, (role, _) in where.items() if role == "lm_head"):
        for row in (2048, 4096, 8192, 16384):
            label = f"lm_head from token id {row} on"
            print(f"  {label:40s} {1:4d} MatMuls  {loss([], {name: head_from_row(name, row)}) - base:+.4f}")


if __name__ == "__main__":
    main()
