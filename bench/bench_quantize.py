"""Quantisation benchmark: onnxpress ``quantize`` vs ONNX Runtime's and Optimum's tools.

MiniLM (all-MiniLM-L6-v2): held-out SOTU sentence-embedding cosine vs fp32, latency at
batch 1 and 8 x 128 tokens, file size. SmolLM2-135M: held-out SOTU perplexity (256-token
windows) and prefill tokens/s. Every row runs with 2 ORT threads in the same process.

    nice python bench/bench_quantize.py [--part minilm|smollm2|all] [--quick]

Prints one table and writes ``bench/results/quantize.json`` (rows of earlier parts are
kept when only one part is run, marked with the run they came from).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
THREADS = 2
SMOLLM2_INT8_BUDGET = 0.095
ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import peers  # noqa: E402
from common import model_size_mb, write_results  # noqa: E402

from onnxpress.export import CACHE_ROOT, cached_export  # noqa: E402
from onnxpress.runtime import time_alternating  # noqa: E402

RESULTS = ROOT / "results" / "quantize.json"
WORK = CACHE_ROOT / "bench-quantize"


def _session(path: Path):
    from onnxpress.runtime import make_session

    return make_session(path, threads=THREADS)


def _latency_ms(path: Path, batch: int, seq: int = 128, runs: int = 20) -> float:
    from onnxpress.calibration import make_feeds

    sess = _session(path)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, (batch, seq)).astype(np.int64)
    feeds = make_feeds(sess, ids, np.ones_like(ids))
    for _ in range(3):
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _calibration(model_path: Path, tok_dir: Path, max_length: int, batch_size: int, max_samples: int):
    from onnxpress.calibration import CalibrationSet
    from onnxpress.datasets import sotu_files
    from onnxpress.model_io import load_model

    return CalibrationSet.from_files(
        sotu_files("calibration"),
        tok_dir,
        load_model(model_path),
        max_length=max_length,
        batch_size=batch_size,
        max_samples=max_samples,
        seed=0,
    )


def _ours(src: Path, out: Path, passes: list[str], calib_batches, tok_dir) -> dict:
    """Run the pass through the compile pipeline's pass manager (with its verification)."""
    from onnxpress.calibration import CalibrationSet
    from onnxpress.model_io import load_model, save_model
    from onnxpress.pass_infra import build_pass
    from onnxpress.pipeline import CompileContext, Pipeline
    from onnxpress.recipe import parse_pass_args

    model = load_model(src)
    calib, held = CalibrationSet(calib_batches, "bench").split(0.15)
    ctx = CompileContext(
        verification=held.batches[:2], calibration=calib, tokenizer_dir=tok_dir, threads=THREADS
    )
    plan = parse_pass_args(passes)
    manager = Pipeline([build_pass(p.name, p.settings) for p in plan.passes], progress=False)
    t = time.perf_counter()
    results = manager.run(model, ctx)
    seconds = time.perf_counter() - t
    save_model(model, out)
    r = results[-1]
    return {
        "pass_seconds": round(seconds, 1),
        "stages": {res.name: res.changes for res in results[:-1]} if len(results) > 1 else None,
        "changes": r.changes,
        "budget_trials": r.details.get("budget_trials") or None,
        "kept_float_by_sensitivity": [
            name for name, why in r.details.get("kept_float", {}).items() if why == "sensitivity"
        ]
        or None,
        "reported_error": r.error,
        "measured_error": r.measured_error,
        "unfused": r.details.get("ort_fusion", {}).get("unfused"),
        "kernels": r.details.get("ort_fusion", {}).get("integer_kernels"),
    }


# -- MiniLM ------------------------------------------------------------------------------------


def minilm_rows(quick: bool) -> list[dict]:
    from onnxpress.datasets import evaluation_sentences
    from onnxpress.evaluation import embedding_fidelity

    src = cached_export("minilm")
    tok = src.parent
    out = WORK / "minilm"
    out.mkdir(parents=True, exist_ok=True)
    sentences = evaluation_sentences(64 if quick else 256, seed=0)
    calib = _calibration(src, tok, 128, 8, 64 if quick else 256).batches
    rows = []

    paths = {}

    def row(name: str, path: Path, extra: dict | None = None):
        fid = embedding_fidelity(str(path), str(src), sentences, tok)
        r = {
            "model": "minilm",
            "variant": name,
            "cosine_mean": round(fid["embedding_cosine_mean"], 5),
            "cosine_min": round(fid["embedding_cosine_min"], 5),
            "size_mb": round(model_size_mb(path), 1),
            **(extra or {}),
        }
        print(json.dumps(r), flush=True)
        rows.append(r)
        paths[name] = path

    row("fp32", src)
    row("ORT quantize_dynamic per-channel s8", peers.ort_quantize_dynamic(src, out, calib))
    row("ORT quantize_static QDQ all ops u8/s8", peers.ort_quantize_static(src, out, calib))
    try:
        row("Optimum ORTQuantizer avx2 dynamic", peers.optimum_avx2(src, out, calib))
    except Exception as exc:  # a tool failing is a result too
        rows.append(
            {"model": "minilm", "variant": "Optimum ORTQuantizer avx2 dynamic", "error": str(exc)[:200]}
        )
    p = out / "onnxpress_static.onnx"
    info = _ours(src, p, ["quantize:mode=static"], calib, tok)
    row("onnxpress static u8 (smooth+GPTQ+auto ranges)", p, info)
    p = out / "onnxpress_static_budget.onnx"
    info = _ours(
        src, p, ["quantize:mode=static,budget=0.003,budget_metric=cosine,sensitivity=local"], calib, tok
    )
    row("onnxpress static u8, budget 1-cos<=0.003", p, info)
    p = out / "onnxpress_dynamic.onnx"
    info = _ours(src, p, ["quantize:mode=dynamic"], calib, tok)
    row("onnxpress dynamic (smooth+GPTQ)", p, info)
    p = out / "onnxpress_prune_lowrank_static.onnx"
    info = _ours(
        src,
        p,
        ["prune_ffn:fraction=0.1", "lowrank:fraction=0.1", "quantize:mode=static"],
        calib,
        tok,
    )
    row("onnxpress prune_ffn 0.1 + lowrank 0.1 + static u8", p, info)
    for batch in (1, 8):
        for name, ms in _interleaved_latency(paths, batch, rounds=3 if quick else 7).items():
            next(r for r in rows if r["variant"] == name)[f"latency_b{batch}_ms"] = round(ms, 2)
    return rows


def _interleaved_latency(paths: dict[str, Path], batch: int, rounds: int, runs: int = 5) -> dict[str, float]:
    """Median latency (ms) per model, measured round-robin (``common.time_alternating``) so that
    load from other processes hits every variant alike (absolute numbers: this run only)."""
    from onnxpress.calibration import make_feeds

    sessions = {name: _session(p) for name, p in paths.items()}
    ids = np.random.default_rng(0).integers(1000, 20000, (batch, 128)).astype(np.int64)
    feeds = {name: make_feeds(s, ids, np.ones_like(ids)) for name, s in sessions.items()}
    calls = {name: (lambda s=s, f=feeds[name]: s.run(None, f)) for name, s in sessions.items()}
    return {name: sec * 1e3 for name, sec in time_alternating(calls, repeats=rounds * runs).items()}


# -- SmolLM2 -----------------------------------------------------------------------------------


def _tokens_per_s(path: Path, seq: int = 256) -> float:
    from onnxpress.calibration import make_feeds

    sess = _session(path)
    ids = np.random.default_rng(0).integers(100, 40000, (1, seq)).astype(np.int64)
    feeds = make_feeds(sess, ids, np.ones_like(ids))
    sess.run(None, feeds)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    return seq / statistics.median(times)


SMOLLM2_ROWS = ("fp32", "ort_dynamic", "dynamic", "ort_rtn", "int4")


def smollm2_rows(quick: bool, wanted=SMOLLM2_ROWS, save=None) -> list[dict]:
    """The SmolLM2 rows named in ``wanted`` (several processes may each run some: every row is
    merged into the results file as soon as it is measured, via ``save``)."""

    from onnxpress.evaluation import perplexity

    src = cached_export("smollm2")
    tok = src.parent
    out = WORK / "smollm2"
    out.mkdir(parents=True, exist_ok=True)
    windows = 16 if quick else 48
    # 32 x 256 tokens: ample for 576- and 1536-wide Hessians; every batch is a full model run
    calib = _calibration(src, tok, 256, 4, 16 if quick else 32).batches
    rows = []
    fp32 = None if "fp32" in wanted else _stored_fp32_ppl(windows)

    def row(name: str, path: Path, extra: dict | None = None):
        nonlocal fp32
        ppl = perplexity(str(path), tok, max_windows=windows)
        fp32 = fp32 or (ppl if name == "fp32" else perplexity(str(src), tok, max_windows=windows))
        r = {
            "model": "smollm2",
            "variant": name,
            "perplexity": round(ppl, 3),
            "ppl_vs_fp32_pct": round(100 * (ppl / fp32 - 1), 2),
            "prefill_tokens_per_s": round(_tokens_per_s(path), 1),
            "size_mb": round(model_size_mb(path), 1),
            "ppl_windows": windows,
            **(extra or {}),
        }
        print(json.dumps(r), flush=True)
        rows.append(r)
        if save is not None:
            save(r)

    if "fp32" in wanted:
        row("fp32", src)
    if "ort_dynamic" in wanted:
        row("ORT quantize_dynamic int8 per-channel", peers.ort_quantize_dynamic(src, out, calib))
    if "dynamic" in wanted:
        _smollm2_dynamic(src, out, calib, tok, row)
    if "int4" in wanted:
        p = out / "onnxpress_int4_b32.onnx"
        info = _ours(src, p, ["quantize:mode=weight_only,bits=4,block_size=32,lm_head_bits=8"], calib, tok)
        # lm_head_bits=8 would keep an untied LM head at int8; SmolLM2's is tied to the embedding
        # (no constant MatMul weight), so it stays float here as in ORT's RTN row
        row("onnxpress weight_only int4 b32 GPTQ act-order", p, info)
    if "ort_rtn" in wanted:
        row("ORT MatMulNBitsQuantizer RTN int4 b32 asym", peers.ort_matmul_nbits(src, out, calib))
    return rows


def _stored_fp32_ppl(windows: int) -> float | None:
    """fp32 perplexity from the results file (deterministic: the same model, windows and ORT)."""
    if not RESULTS.exists():
        return None
    for r in json.loads(RESULTS.read_text()).get("rows", []):
        if r.get("model") == "smollm2" and r.get("variant") == "fp32" and r.get("ppl_windows") == windows:
            return r["perplexity"]
    return None


def _smollm2_dynamic(src, out, calib, tok, row) -> None:
    p = out / "onnxpress_dynamic_budget.onnx"
    # the sensitivity search keeps the MatMuls whose int8 error hurts the logits most in float
    # until the calibration logits are within BUDGET (relative L2) of fp32
    spec = f"quantize:mode=dynamic,budget={SMOLLM2_INT8_BUDGET},sensitivity_batches=2"
    info = _ours(src, p, [spec], calib, tok)
    row(f"onnxpress dynamic int8 (smooth+GPTQ), budget rel-L2 {SMOLLM2_INT8_BUDGET}", p, info)


COLUMNS = [
    "model",
    "variant",
    "cosine_mean",
    "cosine_min",
    "latency_b1_ms",
    "latency_b8_ms",
    "perplexity",
    "ppl_vs_fp32_pct",
    "prefill_tokens_per_s",
    "size_mb",
    "pass_seconds",
    "run",
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("minilm", "smollm2", "all"), default="all")
    ap.add_argument("--quick", action="store_true", help="fewer sentences / windows / calibration samples")
    ap.add_argument(
        "--rows", default=",".join(SMOLLM2_ROWS), help=f"SmolLM2 rows to run, of {','.join(SMOLLM2_ROWS)}"
    )
    args = ap.parse_args(argv)
    os.environ["ONNXPRESS_THREADS"] = str(THREADS)
    run_id = time.strftime("%Y-%m-%dT%H:%M:%S")
    command = " ".join(["nice python bench/bench_quantize.py", *(argv or sys.argv[1:])])

    def save(new_rows: list[dict]) -> None:
        """Merge into the results file: rows of other variants (other parts, other processes)
        are kept with the run they came from."""
        for r in new_rows:
            r.setdefault("run", run_id)
        keys = {(r["model"], r["variant"]) for r in new_rows}
        old = json.loads(RESULTS.read_text()).get("rows", []) if RESULTS.exists() else []
        merged = [r for r in old if (r.get("model"), r.get("variant")) not in keys] + new_rows
        order = {"minilm": 0, "smollm2": 1}
        merged.sort(key=lambda r: order.get(r.get("model"), 2))
        write_results(
            "quantize",
            merged,
            command=command,
            notes={
                "threads": THREADS,
                "quick": args.quick,
                "load_average": os.getloadavg(),
                "shared_machine": "2 cores shared with other jobs: latencies are medians of "
                "round-robin runs; compare rows within one run only",
            },
            columns=COLUMNS,
        )

    if args.part in ("minilm", "all"):
        save(minilm_rows(args.quick))
    if args.part in ("smollm2", "all"):
        smollm2_rows(args.quick, args.rows.split(","), save=lambda r: save([r]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
