"""Quantisation benchmark (issue 8): onnxpress ``quantize`` vs ONNX Runtime's and Optimum's tools.

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
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
THREADS = 2
ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "quantize.json"
WORK = Path(os.environ.get("ONNXPRESS_CACHE", Path.home() / ".cache" / "onnxpress")) / "bench-quantize"


def _export(name: str) -> Path:
    from onnxpress.export import export_model

    shared = Path.home() / ".cache" / "onnxpress" / "onnx" / name / "model.onnx"
    if shared.exists():
        return shared
    return export_model(name, WORK / "export" / name)


def _size_mb(path: Path) -> float:
    data = path.with_name(path.name + ".data")
    return (path.stat().st_size + (data.stat().st_size if data.exists() else 0)) / 1e6


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = THREADS, 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


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


class _Reader:
    """ORT CalibrationDataReader over our batches, padded to a fixed length (ORT's
    calibrators concatenate batches and fail on variable lengths)."""

    def __init__(self, batches, length: int):
        self.items = []
        for b in batches:
            for i in range(len(b["input_ids"])):
                self.items.append({k: _pad(v[i : i + 1], length) for k, v in b.items()})
        self.it = iter(self.items)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.items)


def _pad(v: np.ndarray, length: int) -> np.ndarray:
    if v.ndim == 2 and v.shape[1] < length:
        return np.pad(v, ((0, 0), (0, length - v.shape[1])))
    return v


def _ours(src: Path, out: Path, passes: list[str], calib_batches, tok_dir) -> dict:
    """Run the pass through the compile pipeline's pass manager (with its verification)."""
    from onnxpress.calibration import CalibrationSet
    from onnxpress.model_io import load_model, save_model
    from onnxpress.pass_infra import build_pass
    from onnxpress.pass_manager import CompileContext, PassManager
    from onnxpress.recipe import parse_pass_args

    model = load_model(src)
    calib, held = CalibrationSet(calib_batches, "bench").split(0.15)
    ctx = CompileContext(
        verification=held.batches[:2], calibration=calib, tokenizer_dir=tok_dir, threads=THREADS
    )
    plan = parse_pass_args(passes)
    manager = PassManager([build_pass(p.name, p.settings) for p in plan.passes], progress=False)
    t = time.perf_counter()
    results = manager.run(model, ctx)
    seconds = time.perf_counter() - t
    save_model(model, out)
    r = results[-1]
    return {
        "pass_seconds": round(seconds, 1),
        "changes": r.changes,
        "reported_error": r.error,
        "measured_error": r.measured_error,
        "unfused": r.details.get("ort_fusion", {}).get("unfused"),
        "kernels": r.details.get("ort_fusion", {}).get("integer_kernels"),
    }


# -- MiniLM ------------------------------------------------------------------------------------


def minilm_rows(quick: bool) -> list[dict]:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    from onnxpress.datasets import evaluation_sentences
    from onnxpress.evaluation import embedding_fidelity

    src = _export("minilm")
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
            "size_mb": round(_size_mb(path), 1),
            **(extra or {}),
        }
        print(json.dumps(r), flush=True)
        rows.append(r)
        paths[name] = path

    row("fp32", src)
    p = out / "ort_dynamic.onnx"
    quantize_dynamic(str(src), str(p), per_channel=True, weight_type=QuantType.QInt8)
    row("ORT quantize_dynamic per-channel s8", p)
    p = out / "ort_static.onnx"
    quantize_static(
        str(src),
        str(p),
        _Reader(calib[:8], 128),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    row("ORT quantize_static QDQ all ops u8/s8", p)
    try:
        row("Optimum ORTQuantizer avx2 dynamic", _optimum_avx2(src, out))
    except Exception as exc:  # a tool failing is a result too
        rows.append(
            {"model": "minilm", "variant": "Optimum ORTQuantizer avx2 dynamic", "error": str(exc)[:200]}
        )
    p = out / "onnxpress_static.onnx"
    info = _ours(src, p, ["quantize:mode=static"], calib, tok)
    row("onnxpress static u8 (smooth+GPTQ+auto ranges)", p, info)
    p = out / "onnxpress_static_budget.onnx"
    info = _ours(src, p, ["quantize:mode=static,budget=0.003,budget_metric=cosine,sensitivity=local"], calib, tok)
    row("onnxpress static u8, budget 1-cos<=0.003", p, info)
    p = out / "onnxpress_dynamic.onnx"
    info = _ours(src, p, ["quantize:mode=dynamic"], calib, tok)
    row("onnxpress dynamic (smooth+GPTQ)", p, info)
    for batch in (1, 8):
        for name, ms in _interleaved_latency(paths, batch, rounds=3 if quick else 7).items():
            next(r for r in rows if r["variant"] == name)[f"latency_b{batch}_ms"] = round(ms, 2)
    return rows


def _interleaved_latency(paths: dict[str, Path], batch: int, rounds: int, runs: int = 5) -> dict[str, float]:
    """Median latency per model, measured round-robin so that load from other processes on
    the machine hits every variant alike (absolute numbers are only comparable within a run)."""
    from onnxpress.calibration import make_feeds

    sessions = {name: _session(p) for name, p in paths.items()}
    ids = np.random.default_rng(0).integers(1000, 20000, (batch, 128)).astype(np.int64)
    feeds = {name: make_feeds(s, ids, np.ones_like(ids)) for name, s in sessions.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for name, s in sessions.items():
        s.run(None, feeds[name])
    for _ in range(rounds):
        for name, s in sessions.items():
            for _ in range(runs):
                t = time.perf_counter()
                s.run(None, feeds[name])
                times[name].append((time.perf_counter() - t) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def _optimum_avx2(src: Path, out: Path) -> Path:
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    tmp = out / "optimum_in"
    tmp.mkdir(exist_ok=True)
    for f in src.parent.iterdir():
        if f.is_file() and not (tmp / f.name).exists():
            shutil.copy(f, tmp / f.name)
    quantizer = ORTQuantizer.from_pretrained(tmp, file_name="model.onnx")
    qconfig = AutoQuantizationConfig.avx2(is_static=False, per_channel=True)
    quantizer.quantize(save_dir=out / "optimum", quantization_config=qconfig)
    return out / "optimum" / "model_quantized.onnx"


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


def smollm2_rows(quick: bool) -> list[dict]:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from onnxpress.evaluation import perplexity

    src = _export("smollm2")
    tok = src.parent
    out = WORK / "smollm2"
    out.mkdir(parents=True, exist_ok=True)
    windows = 16 if quick else 48
    calib = _calibration(src, tok, 256, 4, 32 if quick else 64).batches
    rows = []
    fp32 = None

    def row(name: str, path: Path, extra: dict | None = None):
        nonlocal fp32
        ppl = perplexity(str(path), tok, max_windows=windows)
        fp32 = fp32 or ppl
        r = {
            "model": "smollm2",
            "variant": name,
            "perplexity": round(ppl, 3),
            "ppl_vs_fp32_pct": round(100 * (ppl / fp32 - 1), 2),
            "prefill_tokens_per_s": round(_tokens_per_s(path), 1),
            "size_mb": round(_size_mb(path), 1),
            "ppl_windows": windows,
            **(extra or {}),
        }
        print(json.dumps(r), flush=True)
        rows.append(r)

    row("fp32", src)
    p = out / "ort_dynamic.onnx"
    quantize_dynamic(str(src), str(p), per_channel=True, weight_type=QuantType.QInt8)
    row("ORT quantize_dynamic int8 per-channel", p)
    p = out / "onnxpress_dynamic.onnx"
    info = _ours(src, p, ["quantize:mode=dynamic"], calib, tok)
    row("onnxpress dynamic int8 (smooth+GPTQ)", p, info)
    import onnx

    p = out / "ort_rtn_int4_b32.onnx"
    q = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=32, is_symmetric=False)
    q.process()
    q.model.save_model_to_file(str(p), use_external_data_format=False)
    row("ORT MatMulNBitsQuantizer RTN int4 b32 asym", p)
    p = out / "onnxpress_int4_b32.onnx"
    info = _ours(src, p, ["quantize:mode=weight_only,bits=4,block_size=32"], calib, tok)
    row("onnxpress weight_only int4 b32 GPTQ", p, info)
    return rows


def _table(rows: list[dict]) -> str:
    cols = [
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
    ]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in rows:
        lines.append(" | ".join(str(r.get(c, "")) for c in cols))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("minilm", "smollm2", "all"), default="all")
    ap.add_argument("--quick", action="store_true", help="fewer sentences / windows / calibration samples")
    args = ap.parse_args(argv)
    os.environ["ONNXPRESS_THREADS"] = str(THREADS)
    run_id = time.strftime("%Y-%m-%dT%H:%M:%S")
    rows = []
    if args.part in ("minilm", "all"):
        rows += minilm_rows(args.quick)
    if args.part in ("smollm2", "all"):
        rows += smollm2_rows(args.quick)
    for r in rows:
        r["run"] = run_id
    kept = []
    if RESULTS.exists() and args.part != "all":
        other = "smollm2" if args.part == "minilm" else "minilm"
        kept = [r for r in json.loads(RESULTS.read_text()).get("rows", []) if r.get("model") == other]
    all_rows = kept + rows if args.part == "smollm2" else rows + kept
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    import onnxruntime

    RESULTS.write_text(
        json.dumps(
            {
                "threads": THREADS,
                "onnxruntime": onnxruntime.__version__,
                "quick": args.quick,
                "rows": all_rows,
            },
            indent=1,
        )
    )
    print(_table(all_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
