"""Where a model's time goes: ORT's own profiler, summed per operator type.

    python bench/profile_ops.py MODEL.onnx [MODEL.onnx ...] [--batch 8] [--runs 10]

Runs each model at batch x 128 random tokens with 2 threads (after 3 warm-up runs) and prints
the median model_run time and the operators taking the most kernel time. Prints only: a
profile is for reading, ratios between variants belong to bench_compare.py.
"""

import argparse
import collections
import json
import os
from pathlib import Path

import numpy as np

from onnxpress.calibration import make_feeds
from onnxpress.runtime import make_session, session_options


def profile(path: str, batch: int, runs: int, top: int = 12) -> None:
    options = session_options(2)
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(os.environ.get("TMPDIR", "/tmp")) / "onnxpress_profile")
    session = make_session(path, options=options)
    ids = np.random.default_rng(0).integers(1000, 20000, (batch, 128)).astype(np.int64)
    feeds = make_feeds(session, ids, np.ones_like(ids))
    for _ in range(3 + runs):
        session.run(None, feeds)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    per_op, model_runs = collections.Counter(), []
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
        elif e.get("name") == "model_run":
            model_runs.append(e["dur"])
    total = sum(per_op.values())
    print(f"{path}: model_run median {np.median(model_runs[3:]) / 1e3:.1f} ms (batch {batch} x 128, 2 threads)")
    for op, us in per_op.most_common(top):
        print(f"  {op:28s} {us / 1e3 / (3 + runs):7.2f} ms  {100 * us / total:5.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    for path in args.models:
        profile(path, args.batch, args.runs)


if __name__ == "__main__":
    main()
