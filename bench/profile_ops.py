"""Where a model's time goes: ORT's own profiler, summed per operator type.

    python bench/profile_ops.py MODEL.onnx [MODEL.onnx ...] [--batch 8] [--runs 10] [--decode [--head-dim 64]]

Runs each model at batch x 128 random tokens with 2 threads (after 3 warm-up runs) and prints
the median model_run time, the nodes run per call and the operators taking the most kernel
time. ``--decode`` (decoders with a KV cache): one-token steps at batch 1 after a 128-token
prompt, as greedy generation runs them (``--head-dim``: the cache's head size where the model
leaves it symbolic). Prints only: a profile is for reading, ratios between variants belong to
bench_compare.py and bench_decode.py.
"""

import argparse
import collections
import json
import os
from pathlib import Path

import numpy as np

from onnxpress.calibration import make_feeds
from onnxpress.runtime import make_session, session_options


def profile(path: str, batch: int, runs: int, decode: bool = False, head_dim: int = 64, top: int = 12) -> None:
    options = session_options(2)
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(os.environ.get("TMPDIR", "/tmp")) / "onnxpress_profile")
    session = make_session(path, options=options)
    ids = np.random.default_rng(0).integers(1000, 20000, (batch, 128)).astype(np.int64)
    if decode:
        from onnxpress.generation import DecoderRunner

        decoder = DecoderRunner(path, threads=2, head_size=head_dim)
        _, cache = decoder.run(ids[:1], 0, None)  # the prompt's cache, unprofiled
        decoder.session = session
        for step in range(3 + runs):
            _, cache = decoder.run(ids[:1, step : step + 1], 128 + step, cache)
    else:
        feeds = make_feeds(session, ids, np.ones_like(ids))
        for _ in range(3 + runs):
            session.run(None, feeds)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    per_op, nodes, model_runs = collections.Counter(), 0, []
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
            nodes += 1
        elif e.get("name") == "model_run":
            model_runs.append(e["dur"])
    total = sum(per_op.values())
    shape = "one-token decode steps at batch 1 after 128 tokens" if decode else f"batch {batch} x 128"
    print(f"{path}: model_run median {np.median(model_runs[3:]) / 1e3:.1f} ms ({shape}, 2 threads), "
          f"{nodes / (3 + runs):.0f} nodes per run")
    for op, us in per_op.most_common(top):
        print(f"  {op:28s} {us / 1e3 / (3 + runs):7.2f} ms  {100 * us / total:5.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--decode", action="store_true", help="one-token steps with the KV cache, batch 1")
    parser.add_argument("--head-dim", type=int, default=64, help="--decode: the cache's head size if symbolic")
    args = parser.parse_args()
    for path in args.models:
        profile(path, args.batch, args.runs, args.decode, args.head_dim)


if __name__ == "__main__":
    main()
