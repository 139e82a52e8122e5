"""A/B two builds of the ops library: the same onnxpress.Attention layer, timed round-robin in one process.

Each library is registered in its own session (ORT loads each .so once, side by side), so two
kernels can be compared with the host's drift shared between them. The layer is the op
bench's (hidden 384, 12 heads, batch 8, all-ones padding mask).

    python bench/ab_attention_libraries.py OLD/libonnxpress_ops.so NEW/libonnxpress_ops.so [--seq 512] [--threads 2]

Prints the max difference between the libraries' outputs and each one's median time (no JSON:
a check for a kernel change, not a result).
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention_op import BATCH, HIDDEN, onnxpress_model  # noqa: E402

from onnxpress.runtime import session_options, time_alternating  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("libraries", nargs=2, type=Path)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    for library in args.libraries:
        if not library.is_file():
            parser.error(f"{library} is not a file: pass two built libonnxpress_ops.so paths "
                         "(python -m onnxpress.runtime_ops path prints the current one)")

    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal((BATCH, args.seq, HIDDEN)).astype(np.float32) for k in "qkv"}
    feeds["mask"] = np.ones((BATCH, args.seq), np.int64)
    model = onnxpress_model(args.seq).SerializeToString()
    sessions = {}
    for i, library in enumerate(args.libraries):
        options = session_options(args.threads)
        options.register_custom_ops_library(str(library))
        sessions[f"{'AB'[i]}: {library}"] = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    a, b = (s.run(None, feeds)[0] for s in sessions.values())
    print(f"max |A - B| = {float(np.abs(a - b).max()):.3g}")
    medians = time_alternating({k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()},
                               repeats=args.repeats, warmup=2)
    first = next(iter(medians.values()))
    for name, median in medians.items():
        print(f"{median * 1e3:8.2f} ms  {median / first:.3f}  {name}")


if __name__ == "__main__":
    main()
