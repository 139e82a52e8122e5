"""Cross-layer weight-sharing benchmark: the share_weights pass vs the low-rank
pass alone at the same share of linear-layer parameters removed.

SmolLM2-135M at 20% and 30%: perplexity on held-out SOTU text (256-token windows), file
size and peak resident memory of a fresh process that loads the model in ONNX Runtime
and runs one batch. MiniLM (all-MiniLM-L6-v2) at 20%: mean cosine of held-out sentence
embeddings vs fp32, file size.

Data: calibration = SOTU speeches before 1950, evaluation = SOTU speeches from 1990 on
(``onnxpress.datasets``; disjoint files).

    nice python bench/bench_share.py [--quick] [--part minilm|smollm2|all]

Prints one table and writes ``bench/results/share.json`` (all rows from one run; the file
is rewritten after every row, so an interrupted run leaves the rows it finished).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lowrank import calibration, file_size  # noqa: E402
from common import peak_rss_mb, run_pass, write_results  # noqa: E402

from onnxpress.export import cached_export  # noqa: E402

THREADS = 2

# (label, pass, settings). The low-rank rows split the FFN matrices only (the pass's default also
# probes attention); "global one-shot+bc" is the low-rank pass on the same footing as share_weights
# (global ranks, original inputs, bias correction).
FFN = ["ffn.up", "ffn.gate", "ffn.down"]
VARIANTS = [
    ("lowrank uniform seq+bc, FFN, no refit prior", "lowrank", {"allocation": "uniform", "include": FFN, "refit_prior": 0.0}),
    ("lowrank global one-shot+bc", "lowrank", {"allocation": "global", "sequential": False, "include": FFN}),
    ("share_weights default (q/k/v/up/gate in pairs)", "share_weights", {}),
    ("share_weights + o/down shared (output side)", "share_weights",
     {"share": ["attn.q", "attn.k", "attn.v", "ffn.up", "ffn.gate", "attn.o", "ffn.down"]}),
]
# SmolLM2: no sequential low-rank run (it re-collects statistics per layer group, about an hour
# per ratio on 2 cores); both low-rank rows are one-shot with bias correction.
SMOLLM_VARIANTS = [
    ("lowrank uniform one-shot+bc", "lowrank", {"sequential": False, "allocation": "uniform", "include": FFN}),
    *VARIANTS[1:],
]

def _row(model, fraction, label, result, seconds, out: Path, base: Path, **metrics) -> dict:
    d = result.details
    row = {"model": model, "target": fraction, "variant": label, **metrics,
           "linear_params_removed": d.get("fraction_saved"),
           "params_ratio": result.params_after / result.params_before,
           "size_mb": file_size(out) / 2**20, "size_ratio": file_size(out) / file_size(base),
           "verify_rel_l2": result.error, "compile_s": round(seconds, 1), "changes": result.changes}
    if "groups" in d:
        row["groups"] = [{k: g[k] for k in ("role", "layers", "mode", "side", "rank", "params_saved")}
                         | {"calibration_error_max": max(g["calibration_error"])} for g in d["groups"]]
    return row


def bench_minilm(args, work: Path, rows: list[dict], flush) -> None:
    from onnxpress import datasets, evaluation
    from onnxpress.fidelity import row_cosines
    from onnxpress.model_io import load_model

    path = cached_export("minilm")
    tok = path.parent
    calib = calibration(load_model(path), tok, args.minilm_calib, 128, 16)
    sentences = datasets.evaluation_sentences(args.eval_sentences, seed=0)
    ref = evaluation.sentence_embeddings(path, tok, sentences)
    rows.append({"model": "MiniLM", "target": 0.0, "variant": "fp32", "embedding_cosine": 1.0,
                 "size_mb": file_size(path) / 2**20, "size_ratio": 1.0})
    for i, (label, pass_name, settings) in enumerate(VARIANTS):
        out = work / f"minilm-{i}.onnx"
        result, seconds = run_pass(path, pass_name, {"fraction": 0.2, **settings}, calib, out, threads=THREADS)
        cos = row_cosines(ref, evaluation.sentence_embeddings(out, tok, sentences))
        rows.append(_row("MiniLM", 0.2, label, result, seconds, out, path, embedding_cosine=float(cos.mean()),
                         embedding_cosine_min=float(cos.min())))
        print(f"  MiniLM 20% {label}: cosine {cos.mean():.4f} ({seconds:.0f} s)", flush=True)
        out.unlink()
        flush()


def bench_smollm2(args, work: Path, rows: list[dict], flush) -> None:
    from onnxpress import evaluation
    from onnxpress.calibration import make_feeds
    from onnxpress.model_io import load_model

    path = cached_export("smollm2")
    tok = path.parent
    model = load_model(path)
    calib = calibration(model, tok, args.smollm_calib, 256, 4)
    windows = evaluation.perplexity_windows(tok, max_windows=args.ppl_windows)
    ids = np.random.default_rng(0).integers(1000, 40000, (1, 128))
    feeds = make_feeds(model, ids, np.ones_like(ids))
    del model

    def ppl(p):
        total, count = evaluation.window_nll(evaluation.as_session(p, threads=THREADS), windows)
        return float(np.exp(total / count))

    base = ppl(path)
    rows.append({"model": "SmolLM2", "target": 0.0, "variant": "python + onnxruntime only",
                 "peak_rss_mb": peak_rss_mb("-", feeds, THREADS)})
    rows.append({"model": "SmolLM2", "target": 0.0, "variant": "fp32", "perplexity": base, "ppl_vs_fp32": 1.0,
                 "size_mb": file_size(path) / 2**20, "size_ratio": 1.0, "peak_rss_mb": peak_rss_mb(path, feeds, THREADS)})
    flush()
    for fraction, i in args.jobs:
        label, pass_name, settings = SMOLLM_VARIANTS[i]
        out = work / f"smollm2-{fraction}-{i}.onnx"
        result, seconds = run_pass(path, pass_name, {"fraction": fraction, **settings}, calib, out, threads=THREADS)
        value = ppl(out)
        rows.append(_row("SmolLM2", fraction, label, result, seconds, out, path, perplexity=value,
                         ppl_vs_fp32=value / base, peak_rss_mb=peak_rss_mb(out, feeds, THREADS)))
        print(f"  SmolLM2 {fraction:.0%} {label}: perplexity {value:.2f} (fp32 {base:.2f}, {seconds:.0f} s)",
              flush=True)
        out.unlink()
        flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small data (smoke test)")
    parser.add_argument("--part", choices=["minilm", "smollm2", "all"], default="all")
    parser.add_argument("--jobs", default=",".join(f"{f}:{i}" for f in (0.2, 0.3) for i in range(len(SMOLLM_VARIANTS))),
                        help="SmolLM2 runs in order, FRACTION:VARIANT with VARIANT an index into SMOLLM_VARIANTS")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows of bench/results/share.json that this run does not measure again "
                             "(a run split in parts on a slow machine; each part's command is kept)")
    args = parser.parse_args()
    args.jobs = [(float(j.split(":")[0]), int(j.split(":")[1])) for j in args.jobs.split(",")]
    args.minilm_calib, args.eval_sentences = (16, 32) if args.quick else (64, 256)
    args.smollm_calib, args.ppl_windows = (4, 4) if args.quick else (32, 24)
    command = "nice python bench/bench_share.py" + " ".join(a for a in [""] + sys.argv[1:])
    notes = {
        "data": "calibration: SOTU speeches before 1950; evaluation: SOTU speeches from 1990 on (onnxpress.datasets)",
        "minilm": f"{args.minilm_calib} calibration chunks (<=128 tokens); embedding cosine on "
                  f"{args.eval_sentences} held-out sentences (mean pooling)",
        "smollm2": f"{args.smollm_calib} calibration chunks (<=256 tokens); perplexity on {args.ppl_windows} "
                   "evenly spaced held-out 256-token windows (fewer than bench_lowrank's 32: slow shared machine)",
        "target": "share of the attention Q/K/V/O + FFN matrices' parameters removed",
        "peak_rss_mb": f"VmHWM (peak RSS) of a fresh python process that loads the model in ORT CPU ({THREADS} threads) "
                       "and runs one 1 x 128-token batch; the 'python + onnxruntime only' row is that process "
                       "without a model",
        "size": "model file + external data, bytes as written by onnxpress.model_io.save_model",
        "machine_load": f"load average at start {os.getloadavg()}",
    }
    columns = ["model", "target", "variant", "embedding_cosine", "perplexity", "ppl_vs_fp32",
               "linear_params_removed", "params_ratio", "size_mb", "size_ratio", "peak_rss_mb", "verify_rel_l2",
               "compile_s"]
    rows: list[dict] = []
    previous = Path(__file__).parent / "results" / "share.json"
    if args.append:
        notes["append"] = ("rows the last command did not measure come from the earlier command(s), run on the "
                           "same machine")

    def flush():
        measured, kept, commands = {(r["model"], r["target"], r["variant"]) for r in rows}, [], [command]
        if args.append and previous.exists():  # re-read: an earlier part may still be writing rows
            old = json.loads(previous.read_text())
            kept = [r for r in old["rows"] if (r["model"], r["target"], r["variant"]) not in measured]
            commands = [c for c in old["command"].split(" && ") if c != command] + [command]
        write_results("share", kept + rows, command=" && ".join(commands), notes=notes, columns=columns)

    with tempfile.TemporaryDirectory(prefix="bench-share-") as tmp:
        if args.part in ("minilm", "all"):
            bench_minilm(args, Path(tmp), rows, flush)
        if args.part in ("smollm2", "all"):
            bench_smollm2(args, Path(tmp), rows, flush)
    notes["machine_load_end"] = str(os.getloadavg())
    flush()


if __name__ == "__main__":
    main()
