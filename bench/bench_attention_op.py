"""Benchmark onnxpress.Attention against the decomposed attention subgraph and ORT's MultiHeadAttention.

One attention layer (hidden 384, 12 heads, batch 8, an all-ones padding mask) at sequence 128 and
512 on Q/K/V inputs, ORT CPU with 2 intra-op threads. Variants are timed in alternating rounds in
one process (so machine noise hits all of them alike) and the median is reported.

    python bench/bench_attention_op.py [--rounds 30] [--threads 2]
    python bench/bench_attention_op.py --threads 1 --clock cpu --out /tmp/cpu.json   # shared machines

Writes bench/results/attention_op.json. On a machine shared with other jobs, wall-clock times with
2 spinning pool threads mostly measure the contention; ``--threads 1 --clock cpu`` (process CPU
time per run) still compares the kernels fairly.
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxpress.runtime_ops import (
    library_api_version,
    library_path,
    make_attention_node,
    opset_import,
    register,
)

HIDDEN, HEADS, BATCH = 384, 12, 8
HEAD_SIZE = HIDDEN // HEADS
IR_VERSION = 10
RESULTS = Path(__file__).resolve().parent / "results" / "attention_op.json"


def _inputs(seq, mask_type):
    return [helper.make_tensor_value_info(n, TensorProto.FLOAT, [BATCH, seq, HIDDEN]) for n in ("q", "k", "v")] + [
        helper.make_tensor_value_info("mask", mask_type, [BATCH, seq])
    ]


def _model(nodes, seq, mask_type, inits=(), domains=()):
    graph = helper.make_graph(nodes, "attention", _inputs(seq, mask_type),
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [BATCH, seq, HIDDEN])],
                              initializer=list(inits))
    opsets = [helper.make_opsetid("", 17), *domains]
    return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)


def decomposed_model(seq):
    """Attention the way an exported BERT spells it (transformers' eager BertSelfAttention)."""
    inits = [
        numpy_helper.from_array(np.array([BATCH, seq, HEADS, HEAD_SIZE], np.int64), "heads_shape"),
        numpy_helper.from_array(np.array([BATCH, seq, HIDDEN], np.int64), "out_shape"),
        numpy_helper.from_array(np.array(1.0 / np.sqrt(HEAD_SIZE), np.float32), "scale"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "min_value"),
        numpy_helper.from_array(np.array([1, 2], np.int64), "mask_axes"),
    ]
    nodes = [
        helper.make_node("Reshape", ["q", "heads_shape"], ["q4"]),
        helper.make_node("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["k", "heads_shape"], ["k4"]),
        helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["v", "heads_shape"], ["v4"]),
        helper.make_node("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["qh", "kt"], ["scores"]),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        # extended attention mask: (1 - mask) * finfo.min, broadcast as [B, 1, 1, S]
        helper.make_node("Unsqueeze", ["mask", "mask_axes"], ["mask4"]),
        helper.make_node("Cast", ["mask4"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "mask_f"], ["inverted"]),
        helper.make_node("Mul", ["inverted", "min_value"], ["mask_bias"]),
        helper.make_node("Add", ["scaled", "mask_bias"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "vh"], ["context"]),
        helper.make_node("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["context_t", "out_shape"], ["out"]),
    ]
    return _model(nodes, seq, TensorProto.INT64, inits)


def mha_model(seq):
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v", "", "mask"], ["out"], domain="com.microsoft",
                            num_heads=HEADS)
    return _model([node], seq, TensorProto.INT32, domains=[helper.make_opsetid("com.microsoft", 1)])


def onnxpress_model(seq, window=0):
    node = make_attention_node("q", "k", "v", "out", num_heads=HEADS, attention_mask="mask", window=window)
    return _model([node], seq, TensorProto.INT64, domains=[opset_import()])


def session(model, threads, custom_ops):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if custom_ops:
        register(options)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def bench_seq(seq, threads, rounds, with_window, clock=time.perf_counter):
    rng = np.random.default_rng(seq)
    qkv = {n: rng.standard_normal((BATCH, seq, HIDDEN)).astype(np.float32) for n in ("q", "k", "v")}
    mask64 = np.ones((BATCH, seq), np.int64)
    variants = {
        "decomposed": (session(decomposed_model(seq), threads, False), {**qkv, "mask": mask64}),
        "MultiHeadAttention": (session(mha_model(seq), threads, False), {**qkv, "mask": mask64.astype(np.int32)}),
        "onnxpress.Attention": (session(onnxpress_model(seq), threads, True), {**qkv, "mask": mask64}),
    }
    if with_window:
        variants["onnxpress.Attention window=128"] = (
            session(onnxpress_model(seq, window=128), threads, True), {**qkv, "mask": mask64})

    outputs = {name: sess.run(None, feeds)[0] for name, (sess, feeds) in variants.items()}  # also warm-up
    for _ in range(2):
        for sess, feeds in variants.values():
            sess.run(None, feeds)
    times = {name: [] for name in variants}
    for _ in range(rounds):  # alternate so that load spikes on a shared machine hit every variant
        for name, (sess, feeds) in variants.items():
            start = clock()
            sess.run(None, feeds)
            times[name].append((clock() - start) * 1e3)

    reference = outputs["decomposed"]
    rows = {}
    for name in variants:
        rows[name] = {
            "median_ms": statistics.median(times[name]),
            "min_ms": min(times[name]),
            "max_abs_diff_vs_decomposed": float(np.abs(outputs[name] - reference).max()),
        }
    if with_window:
        rows["onnxpress.Attention window=128"]["max_abs_error_vs_full_attention"] = float(
            np.abs(outputs["onnxpress.Attention window=128"] - outputs["onnxpress.Attention"]).max())
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seqs", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: perf_counter; cpu: process CPU time (use with --threads 1)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    library = library_path()
    results = {
        "config": {"hidden": HIDDEN, "heads": HEADS, "batch": BATCH, "threads": args.threads,
                   "rounds": args.rounds, "clock": args.clock, "onnxruntime": ort.__version__, "cpu": _cpu_name(),
                   "library": str(library), "library_ort_api": library_api_version(library),
                   "load_average_at_start": os.getloadavg()[0]},
        "seq": {},
    }
    for seq in args.seqs:
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        results["seq"][str(seq)] = bench_seq(seq, args.threads, args.rounds, with_window=seq >= 512, clock=clock)
    results["config"]["load_average_at_end"] = os.getloadavg()[0]

    print(f"attention layer: hidden {HIDDEN}, {HEADS} heads, batch {BATCH}, {args.threads} threads, "
          f"median of {args.rounds} alternating rounds, {args.clock} clock (ORT {ort.__version__})")
    print(f"{'seq':>5}  {'variant':<32}{'median ms':>10}{'vs decomposed':>15}{'max |diff|':>12}")
    for seq, rows in results["seq"].items():
        base = rows["decomposed"]["median_ms"]
        for name, row in rows.items():
            row["ratio_vs_decomposed"] = row["median_ms"] / base
            extra = (f"  (max error vs full attention {row['max_abs_error_vs_full_attention']:.3g})"
                     if "max_abs_error_vs_full_attention" in row else "")
            print(f"{seq:>5}  {name:<32}{row['median_ms']:>10.2f}{row['ratio_vs_decomposed']:>14.2f}x"
                  f"{row['max_abs_diff_vs_decomposed']:>12.2e}{extra}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


def _cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
