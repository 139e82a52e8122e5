"""Benchmark onnxpress.Attention against the decomposed attention subgraph and ORT's MultiHeadAttention.

One attention layer (hidden 384, 12 heads, head size 32, batch 8, an all-ones padding mask) on
Q/K/V inputs at sequence 128 and 512, ORT CPU with 2 intra-op threads (the edge target's setting) and,
as a second view less exposed to a busy machine's scheduling, 1 thread. Variants are timed
round-robin in one process (bench/common.py's time_alternating), so load drift hits all of them
alike; ratios are of medians from the same run. At 512 the sliding-window variant (window 128,
non-causal: each query sees keys within 127 positions) is timed too, with its error against
exact attention.

A roofline row per thread count puts the goals in the machine's terms: the attention's two
matrix products (4 * batch * heads * seq^2 * head_size flops) timed at the speed of ORT's
own large fp32 MatMul (MLAS sgemm, 1024^3, same thread count) give the fastest any exact
fp32 kernel could be before its softmax, as a ratio of the decomposed subgraph's time.

    nice python bench/bench_attention_op.py [--repeats 20] [--threads 2 1] [--seqs 128 512]

Writes bench/results/attention_op.json (rows + machine header + load averages).
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402

from onnxpress.runtime import make_session, time_alternating  # noqa: E402
from onnxpress.runtime_ops import (  # noqa: E402
    library_api_version,
    library_path,
    make_attention_node,
    opset_import,
)

HIDDEN, HEADS, BATCH = 384, 12, 8
HEAD_SIZE = HIDDEN // HEADS
IR_VERSION = 10
WINDOW = 128


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


def session(model, threads):
    return make_session(model.SerializeToString(), threads=threads)  # registers the library for onnxpress ops


def attention_flops(seq):
    return 4 * BATCH * HEADS * seq * seq * HEAD_SIZE


def sgemm_gflops(threads, n=1024, repeats=10):
    """ORT's fp32 MatMul throughput on a large square product: the machine's practical FMA peak."""
    a, b = (helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in ("a", "b"))
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "sgemm", [a, b],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    sess = session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION),
                   threads)
    x = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    median = time_alternating({"sgemm": lambda: sess.run(None, {"a": x, "b": x})}, repeats=repeats, warmup=2)["sgemm"]
    return 2 * n**3 / median / 1e9


def bench_seq(seq, threads, repeats):
    rng = np.random.default_rng(seq)
    qkv = {n: rng.standard_normal((BATCH, seq, HIDDEN)).astype(np.float32) for n in ("q", "k", "v")}
    mask64 = np.ones((BATCH, seq), np.int64)
    variants = {
        "decomposed": (session(decomposed_model(seq), threads), {**qkv, "mask": mask64}),
        "MultiHeadAttention": (session(mha_model(seq), threads), {**qkv, "mask": mask64.astype(np.int32)}),
        "onnxpress.Attention": (session(onnxpress_model(seq), threads), {**qkv, "mask": mask64}),
    }
    window = f"onnxpress.Attention window={WINDOW}"
    if seq > 2 * WINDOW:
        variants[window] = (session(onnxpress_model(seq, window=WINDOW), threads), {**qkv, "mask": mask64})

    outputs = {name: sess.run(None, feeds)[0] for name, (sess, feeds) in variants.items()}
    runs = {name: (lambda s=sess, f=feeds: s.run(None, f)) for name, (sess, feeds) in variants.items()}
    medians = time_alternating(runs, repeats=repeats, warmup=2)

    reference = outputs["decomposed"]
    rows = []
    for name, median in medians.items():
        row = {"seq": seq, "threads": threads, "variant": name, "median_ms": median * 1e3,
               "vs_decomposed": median / medians["decomposed"], "vs_mha": median / medians["MultiHeadAttention"],
               "gflops": attention_flops(seq) / median / 1e9 if name != window else None,  # exact work only
               "max_abs_diff": float(np.abs(outputs[name] - reference).max())}
        if name == window:  # the approximation's cost: its error against exact attention
            exact = outputs["onnxpress.Attention"]
            row["rel_l2_vs_exact"] = float(np.linalg.norm(outputs[name] - exact) / np.linalg.norm(exact))
        rows.append(row)
    peak = sgemm_gflops(threads)
    floor = attention_flops(seq) / (peak * 1e9)
    rows.append({"seq": seq, "threads": threads, "variant": "roofline: matrix products at sgemm speed",
                 "median_ms": floor * 1e3, "vs_decomposed": floor / medians["decomposed"],
                 "vs_mha": floor / medians["MultiHeadAttention"], "gflops": peak})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--seqs", type=int, nargs="+", default=[128, 512])
    args = parser.parse_args()

    library = library_path()
    load_start = os.getloadavg()
    rows = [row for threads in args.threads for seq in args.seqs for row in bench_seq(seq, threads, args.repeats)]
    notes = {"hidden": HIDDEN, "heads": HEADS, "head_size": HEAD_SIZE, "batch": BATCH, "repeats": args.repeats,
             "window": WINDOW, "library": str(library), "library_ort_api": library_api_version(library),
             "load_average_start": load_start, "load_average_end": os.getloadavg(),
             "reading": "compare the ratios (same run, alternating); absolute ms depend on the load",
             "goal": "onnxpress <= 0.8x decomposed at 128, <= 0.5x at 512, <= 1.0x MultiHeadAttention",
             "roofline": "the 'roofline' rows: the two matrix products alone at ORT's large-sgemm speed on this "
                         "machine, no softmax - no exact fp32 kernel can beat that ratio here"}
    command = "nice python bench/bench_attention_op.py " + " ".join(sys.argv[1:])
    write_results("attention_op", rows, command=command.strip(), notes=notes)


if __name__ == "__main__":
    main()
