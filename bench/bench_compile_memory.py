"""Peak memory of compiling a packaged model (default SmolLM2-135M: 539 MB of float32 weights stored
inline) with each of ``--recipes``, each compile in a fresh process: the compile's own peak memory
(its report's ``peak_rss_mb``: the kernel's high-water mark of resident memory, which catches what
polling misses), the process tree's RSS and anonymous memory polled every 0.2 s
(``common.run_polled``), the wall time, and what the compile measured against the input model
(perplexity change on the held-out SOTU windows and on BBC News, a domain the calibration never saw;
MatMuls quantised), with each peak over the model file's size.

    python bench/bench_compile_memory.py [--model smollm2] [--recipes balanced edge-int4]

Writes ``bench/results/compile_memory.json`` (rows of recipes not run this time kept when they ran
on this machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import model_size_mb, rows_kept_from_earlier, run_polled, write_results  # noqa: E402

from onnxpress.export import CACHE_ROOT, cached_export  # noqa: E402

WORK = CACHE_ROOT / "bench-compile-memory"


def compile_row(src: Path, recipe: str) -> dict:
    out = WORK / f"{recipe}.onnx"
    row, _ = run_polled(f"compile {recipe}", ["onnxpress", "compile", str(src), "-o", str(out), "--recipe", recipe,
                                              "--calib", "sotu", "--quiet"])
    model_gb = model_size_mb(src) / 1e3
    row["model_gb"] = round(model_gb, 3)
    if not row["ok"]:
        return row
    report = json.loads(out.with_suffix(".report.json").read_text())
    row["report_peak_gb"] = round(report["peak_rss_mb"] * 2**20 / 1e9, 3)
    row["report_peak_over_model"] = round(row["report_peak_gb"] / model_gb, 2)
    row["rss_over_model"] = round(row["peak_rss_gb"] / model_gb, 2)
    for key, corpus in (("fidelity", "seen"), ("fidelity_unseen", "unseen")):
        change = (report.get(key) or {}).get("perplexity_change")
        row[f"perplexity_change_{corpus}"] = None if change is None else round(change, 4)
    row["matmuls_quantized"] = sum(p["changes"].get("matmuls_quantized", 0) for p in report["passes"])
    row["matmuls_kept_float"] = sum(p["changes"].get("matmuls_kept_float", 0) for p in report["passes"])
    row["output_mb"] = round(model_size_mb(out), 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="a packaged model (default smollm2)")
    parser.add_argument("--recipes", nargs="+", default=["balanced"])
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    src = Path(cached_export(args.model))
    rows = [{"model": args.model, **compile_row(src, recipe)} for recipe in args.recipes]
    write_results("compile_memory", rows_kept_from_earlier("compile_memory", rows) + rows,
                  command=" ".join(["python bench/bench_compile_memory.py", *sys.argv[1:]]),
                  notes={"calibration": "--calib sotu (seen: SOTU held-out windows; unseen: BBC News)",
                         "report_peak_gb": "the compile's report: the kernel's high-water mark (VmHWM) of its process",
                         "peak_rss_gb": "polled every 0.2 s over the process tree; counts mapped file pages"},
                  columns=["model", "step", "seconds", "report_peak_gb", "report_peak_over_model", "peak_rss_gb",
                           "peak_anon_gb", "model_gb", "perplexity_change_seen", "perplexity_change_unseen",
                           "matmuls_quantized", "matmuls_kept_float", "output_mb"])


if __name__ == "__main__":
    main()
