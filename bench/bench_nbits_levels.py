"""MatMulNBits' compute types at decode and at prefill, against float32 MatMul.

    python bench/bench_nbits_levels.py [--layers 8] [--rounds 9]

A stack of SmolLM2-sized MLP projections (576 -> 1536 -> 576, ``--layers`` of them) as
float32 MatMuls and as MatMulNBits with 4- and 8-bit weights (blocks of 32, random codes) at
``accuracy_level`` 0 (float compute: the weights dequantised for MLAS's float kernels) and 4
(activations rounded to int8: MLAS's integer kernels); levels 1-3 take level 0's path on x86.
Timed round-robin in one process, 2 threads, at 1 token (a decode step) and 128 tokens (a
prompt), as ratios to float32. Which level is faster depends on the ISA, and at one token
and at 128 tokens it need not be the same one: record the flags with the numbers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnxpress.runtime import make_session, time_alternating

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402

HIDDEN, FFN, BLOCK = 576, 1536, 32


def stack(layers: int, bits: int | None, level: int = 0) -> bytes:
    """``layers`` up / down projection pairs; ``bits`` None: float32 MatMuls."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        for j, (k, n) in enumerate([(HIDDEN, FFN), (FFN, HIDDEN)]):
            w, y = f"w{i}_{j}", f"y{i}_{j}"
            if bits is None:
                inits.append(numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32) * 0.02, w))
                nodes.append(helper.make_node("MatMul", [x, w], [y]))
            else:
                blocks = k // BLOCK
                codes = rng.integers(0, 256, (n, blocks, BLOCK * bits // 8), dtype=np.uint8)
                scales = rng.random(n * blocks, dtype=np.float32) * 0.01
                inits += [numpy_helper.from_array(codes, w), numpy_helper.from_array(scales, w + "_scale")]
                nodes.append(helper.make_node("MatMulNBits", [x, w, w + "_scale"], [y], domain="com.microsoft",
                                              K=k, N=n, bits=bits, block_size=BLOCK, accuracy_level=level))
            x = y
    nodes[-1].output[0] = "y"
    io = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, "tokens", HIDDEN]) for name in ("x", "y")]
    graph = helper.make_graph(nodes, "mlp_stack", io[:1], io[1:], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model.SerializeToString()


def repeated(session, feeds, calls: int):
    return lambda: [session.run(None, feeds) for _ in range(calls)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    variants = {"float32 MatMul": (None, 0)}
    variants.update({f"int{bits} level {level}": (bits, level) for bits in (4, 8) for level in (0, 4)})
    sessions = {name: make_session(stack(args.layers, bits, level), threads=2) for name, (bits, level) in variants.items()}
    rows = []
    for tokens, phase in ((1, "decode step"), (128, "prompt")):
        feeds = {"x": np.random.default_rng(1).standard_normal((1, tokens, HIDDEN), dtype=np.float32)}
        calls = 20 if tokens == 1 else 3  # a sample long enough for the clock
        seconds = time_alternating({name: repeated(s, feeds, calls) for name, s in sessions.items()},
                                   repeats=args.rounds)
        base = seconds["float32 MatMul"]
        for name, s in seconds.items():
            rows.append({"tokens": tokens, "phase": phase, "variant": name, "ms": round(1e3 * s / calls, 3),
                         "vs_float32": round(s / base, 3)})
    command = "python bench/bench_nbits_levels.py " + " ".join(sys.argv[1:])
    write_results("nbits_levels", rows, command=command.strip(),
                  notes={"matmuls": f"{args.layers} x ({HIDDEN}->{FFN}, {FFN}->{HIDDEN}), blocks of {BLOCK}, 2 threads"})


if __name__ == "__main__":
    main()
