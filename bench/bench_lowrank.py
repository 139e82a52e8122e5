"""Low-rank splitting benchmark: plain SVD vs activation-aware (whitened) SVD,
and the options of the activation-aware pass, end to end.

MiniLM (all-MiniLM-L6-v2) at 20% and 40% of its linear-layer parameters removed
(share of ALL attention Q/K/V/O + FFN weight parameters): mean cosine of held-out sentence embeddings vs
fp32. SmolLM2-135M at 20%: perplexity on held-out SOTU text (256-token windows).
Every variant's ONNX Runtime latency (2 threads, medians of round-robin runs in this
process) and file size are given as ratios to the unsplit model.

Data: calibration = SOTU speeches before 1950, evaluation = SOTU speeches from 1990 on
(``onnxpress.datasets``; disjoint files).

    nice python bench/bench_lowrank.py [--quick]

Prints one table and writes ``bench/results/lowrank.json`` (all rows from one run).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_pass, write_results  # noqa: E402

from onnxpress.export import cached_export  # noqa: E402
from onnxpress.runtime import time_alternating  # noqa: E402

THREADS = 2

# (label, settings): the comparison that picked the defaults. "one-shot" = every matrix
# fitted on the original model's inputs; "seq" = fitted layer after layer on the inputs of
# the model compressed so far, by least squares to the original outputs; "bc" = bias correction;
# "prior" = the least-squares refit pulled towards the original weight (refit_prior); "probe" =
# ranks allocated by the model's measured output loss (allocation "probe"). Every budget is a
# share of ALL the layers' linear parameters (attention Q/K/V/O + FFN, scope "linear"),
# whichever matrices a variant splits. "_calib": "sentences" = single calibration sentences.
ALL = ["ffn.up", "ffn.gate", "ffn.down", "attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o"]
FFN = ["ffn.up", "ffn.gate", "ffn.down"]
PLAIN = {"method": "plain", "sequential": False, "bias_correction": False, "allocation": "uniform", "include": ALL}
PREVIOUS = {"allocation": "uniform", "include": FFN, "refit_prior": 0.0}  # the default before the probes
MINILM_VARIANTS = {
    0.2: [
        ("plain SVD, all matrices", PLAIN),
        ("whitened uniform seq+bc+res, FFN (previous default)", PREVIOUS),
        ("whitened uniform seq+bc+res+prior, FFN", {"allocation": "uniform", "include": FFN}),
        ("whitened probe seq+bc+res+prior, all matrices (default)", {}),
        ("whitened probe seq+bc+res+prior, all matrices (default), sentence calibration", {"_calib": "sentences"}),
    ],
    0.4: [
        ("plain SVD, all matrices", PLAIN),
        ("whitened probe seq+bc+res+prior, all matrices (default)", {}),
    ],
}
SMOLLM_VARIANTS = [
    ("plain SVD, all matrices", PLAIN),
    ("whitened uniform seq+bc+res+prior, FFN", {"allocation": "uniform", "include": FFN}),
    ("whitened probe seq+bc+res+prior, all matrices (default)", {}),
]


def calibration(model, tok_dir, samples: int, max_length: int, batch_size: int, *, sentences: bool = False):
    """SOTU calibration split: chunks of consecutive sentences filling ``max_length`` tokens,
    or (``sentences``) single sentences, like the held-out sentences MiniLM is scored on."""
    from onnxpress import datasets
    from onnxpress.calibration import CalibrationSet

    if sentences:
        texts = [s for f in datasets.sotu_files("calibration")
                 for s in datasets.split_sentences(datasets.read_text(f), min_chars=40)]
        return CalibrationSet.from_texts(texts, tok_dir, model, max_length=max_length, batch_size=batch_size,
                                         max_samples=samples, seed=0, source="SOTU calibration sentences")
    return CalibrationSet.from_files(datasets.sotu_files("calibration"), tok_dir, model, max_length=max_length,
                                     batch_size=batch_size, max_samples=samples, seed=0)


def file_size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def latency(paths: dict[str, Path], feeds: dict, repeats: int) -> dict[str, float]:
    from onnxpress.runtime import make_session

    sessions = {k: make_session(p, threads=THREADS) for k, p in paths.items()}
    runs = {}
    for key, sess in sessions.items():
        wanted = {i.name for i in sess.get_inputs()}
        feed = {k: v for k, v in feeds.items() if k in wanted}
        runs[key] = lambda s=sess, f=feed: s.run(None, f)
    return time_alternating(runs, repeats=repeats, warmup=2)


def bench_minilm(args, work: Path, rows: list[dict]) -> None:
    from onnxpress import datasets, evaluation
    from onnxpress.calibration import make_feeds
    from onnxpress.fidelity import row_cosines
    from onnxpress.model_io import load_model

    path = cached_export("minilm")
    tok = path.parent
    model = load_model(path)
    calib_full = calibration(model, tok, args.minilm_calib, 128, 16)
    sentences = datasets.evaluation_sentences(args.eval_sentences, seed=0)
    ref = evaluation.sentence_embeddings(path, tok, sentences)
    paths = {"fp32": path}
    rows.append({"model": "MiniLM", "target": 0.0, "variant": "fp32", "embedding_cosine": 1.0, "key": "fp32"})
    for fraction, variants in MINILM_VARIANTS.items():
        for label, settings in variants:
            settings = dict(settings)
            by_sentence = settings.pop("_calib", None) == "sentences"
            calib = calibration(model, tok, args.minilm_calib, 128, 16, sentences=True) if by_sentence else calib_full
            key = f"minilm-{fraction}-{len(paths)}"
            out = work / f"{key}.onnx"
            result, seconds = run_pass(path, "lowrank", {"fraction": fraction, **settings}, calib, out, threads=THREADS)
            cos = row_cosines(ref, evaluation.sentence_embeddings(out, tok, sentences))
            paths[key] = out
            rows.append(_row("MiniLM", fraction, label, result, seconds, key, embedding_cosine=float(cos.mean()),
                             embedding_cosine_min=float(cos.min()), calibration=calib.source))
            print(f"  MiniLM {fraction:.0%} {label}: cosine {cos.mean():.4f} ({seconds:.0f} s)", flush=True)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, (8, 128))
    feeds = make_feeds(model, ids, np.ones_like(ids))
    _add_speed("MiniLM", rows, paths, feeds, args.repeats)


def bench_smollm2(args, work: Path, rows: list[dict]) -> None:
    from onnxpress import evaluation
    from onnxpress.calibration import make_feeds
    from onnxpress.model_io import load_model

    path = cached_export("smollm2")
    tok = path.parent
    model = load_model(path)
    calib = calibration(model, tok, args.smollm_calib, 128, 4)
    windows = evaluation.perplexity_windows(tok, max_windows=args.ppl_windows)

    def ppl(p):
        total, count = evaluation.window_nll(evaluation.as_session(p, threads=THREADS), windows)
        return float(np.exp(total / count))

    base = ppl(path)
    paths = {"fp32": path}
    rows.append({"model": "SmolLM2", "target": 0.0, "variant": "fp32", "perplexity": base, "ppl_vs_fp32": 1.0,
                 "key": "fp32"})
    for label, settings in SMOLLM_VARIANTS:
        key = f"smollm2-{len(paths)}"
        out = work / f"{key}.onnx"
        result, seconds = run_pass(path, "lowrank", {"fraction": 0.2, **settings}, calib, out, threads=THREADS)
        value = ppl(out)
        paths[key] = out
        rows.append(_row("SmolLM2", 0.2, label, result, seconds, key, perplexity=value, ppl_vs_fp32=value / base,
                         calibration=calib.source, evaluation=f"{len(windows)} held-out SOTU windows of "
                         f"{windows.shape[1]} tokens"))
        print(f"  SmolLM2 20% {label}: perplexity {value:.2f} (fp32 {base:.2f}, {seconds:.0f} s)", flush=True)
    plain = next(r["perplexity"] for r in rows if r["model"] == "SmolLM2" and r["variant"].startswith("plain SVD"))
    for r in rows:
        if r["model"] == "SmolLM2" and "perplexity" in r:
            r["ppl_vs_plain"] = r["perplexity"] / plain
    ids = np.random.default_rng(0).integers(1000, 40000, (1, 128))
    _add_speed("SmolLM2", rows, paths, make_feeds(model, ids, np.ones_like(ids)), args.repeats)


def _row(model, fraction, label, result, seconds, key, **metrics) -> dict:
    linear = result.details.get("fraction_saved")
    return {"model": model, "target": fraction, "variant": label, **metrics,
            "linear_params_removed": linear, "params_ratio": result.params_after / result.params_before,
            "macs_ratio": result.macs_after / result.macs_before, "split": result.changes.get("matrices_split"),
            "verify_rel_l2": result.error, "compile_s": round(seconds, 1), "key": key,
            "load_average_1min": round(os.getloadavg()[0], 1)}


def _add_speed(model: str, rows: list[dict], paths: dict[str, Path], feeds: dict, repeats: int) -> None:
    times = latency(paths, feeds, repeats)
    base_t, base_size = times["fp32"], file_size(paths["fp32"])
    for r in rows:
        if r["model"] == model:
            r["latency_ratio"] = times[r["key"]] / base_t
            r["size_ratio"] = file_size(paths[r["key"]]) / base_size
            if r["key"] == "fp32":
                r["latency_ms"] = times["fp32"] * 1000


def _other_part_rows(part: str) -> list[dict]:
    """A --part run keeps the other model's rows of bench/results/lowrank.json (each row
    names the command that measured it; speed ratios are only within one model's rows)."""
    import json

    path = Path(__file__).parent / "results" / "lowrank.json"
    if part == "all" or not path.exists():
        return []
    other = "SmolLM2" if part == "minilm" else "MiniLM"
    return [r for r in json.loads(path.read_text())["rows"] if r.get("model") == other]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small data and few repeats (smoke test)")
    parser.add_argument("--part", choices=["minilm", "smollm2", "all"], default="all")
    args = parser.parse_args()
    args.minilm_calib, args.eval_sentences = (32, 64) if args.quick else (256, 256)
    args.smollm_calib, args.ppl_windows = (8, 4) if args.quick else (16, 8)
    args.repeats = 3 if args.quick else 15
    rows: list[dict] = []
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-lowrank-") as tmp:
        if args.part in ("minilm", "all"):
            bench_minilm(args, Path(tmp), rows)
        if args.part in ("smollm2", "all"):
            bench_smollm2(args, Path(tmp), rows)
    command = "nice python bench/bench_lowrank.py" + (" --quick" if args.quick else "") + \
        (f" --part {args.part}" if args.part != "all" else "")
    for r in rows:
        r["command"] = command
    rows = _other_part_rows(args.part) + rows
    notes = {
        "data": "calibration: SOTU speeches before 1950; evaluation: SOTU speeches from 1990 on (onnxpress.datasets)",
        "minilm": f"embedding cosine vs fp32 on {args.eval_sentences} held-out sentences (mean pooling); "
                  "calibration in each row",
        "smollm2": "perplexity on held-out 256-token windows; calibration in each row",
        "target": "share removed of the parameters of ALL the layers' linear weight matrices (attention Q/K/V/O + "
                  "FFN; scope 'linear'; biases, embeddings and norms not counted), whichever matrices a variant "
                  "splits; linear_params_removed is the measured share, params_ratio the whole model's",
        "variants": "one-shot: every matrix fitted on the original model's inputs; seq: fitted in graph order on the "
                    "inputs of the model compressed so far, towards the original outputs; bc: bias correction; "
                    "res: residual correction (O/down fits also cancel upstream error in the residual stream); "
                    "prior: least-squares refits pulled towards the original weight (refit_prior 1 pseudo-token per "
                    "input dimension); probe: ranks allocated by the measured output loss of each (layer, role) split "
                    "alone at a few shares (allocation 'probe'); uniform: every split matrix loses the same share",
        "latency": f"ORT CPU, {THREADS} threads, median of round-robin runs; MiniLM batch 8 x 128 tokens, "
                   "SmolLM2 1 x 128 tokens (prefill)",
    }
    columns = ["model", "target", "variant", "embedding_cosine", "perplexity", "ppl_vs_fp32", "ppl_vs_plain",
               "linear_params_removed", "params_ratio", "macs_ratio", "latency_ratio", "size_ratio", "compile_s"]
    notes["machine_load"] = (f"shared by several jobs (2 cores): 1-minute load average {load_start:.1f} at the start, "
                             f"{os.getloadavg()[0]:.1f} at the end; per-row load_average_1min")
    write_results("lowrank", rows, command=command, notes=notes, columns=columns)


if __name__ == "__main__":
    main()
