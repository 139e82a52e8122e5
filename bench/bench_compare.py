"""Side-by-side benchmark: onnxpress's passes and recipes against the peers.

For each model, in one process: the peers (ORT fp32, ORT transformers optimizer, ORT
``quantize_dynamic`` per-channel, ORT ``quantize_static`` QDQ, Optimum ORTQuantizer
avx2, onnxsim 0.8.1 head pruning; decoders: ``MatMulNBitsQuantizer`` int4), each
onnxpress pass alone at two strengths, and the packaged recipes. Columns: file size,
latency at batch 1 and batch 8 x 128 tokens (medians of round-robin runs, so all
variants share the machine's drift; ratios against ORT fp32), tokens/s at batch 8 for
decoders, peak RSS of a fresh process that loads the model and runs one batch-8 call,
held-out fidelity against fp32 on the evaluation splits of both corpora - the SOTU
speeches the calibration's domain, BBC News a domain it never saw (mean/min
sentence-embedding cosine, or perplexity) - BBC-probe accuracy for encoders, and compile
time. Every onnxpress variant calibrates with ``--calib sotu``.

    OPENBLAS_NUM_THREADS=1 nice python bench/bench_compare.py --models minilm [smollm2] [path/model.onnx] [--quick]

Prints one table per model and writes ``bench/results/compare.json`` (rows of models not
run this time are kept) and a Pareto plot ``bench/results/compare.<model>.png``
(fidelity vs batch-8 latency, marker area = file size; the calibration's domain on the left,
BBC News on the right).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, compile_cached, machine, model_size_mb, peak_rss_mb, record_build, write_results  # noqa: E402
from peers import DECODER_PEERS, ENCODER_PEERS  # noqa: E402

from onnxpress.export import CACHE_ROOT  # noqa: E402
from onnxpress.runtime import time_alternating  # noqa: E402

THREADS = 2
# evaluation corpora and their column prefixes: SOTU (the calibration's domain), BBC News (unseen)
CORPORA = {"sotu": "", "bbc": "bbc_"}
WORK = CACHE_ROOT / "bench-compare"
# Each pass alone at two strengths (the second the stronger).
ENCODER_PASSES = [
    ("attention (exact, ORT fused op)", ["cleanup", "attention:target=onnxruntime"]),
    ("prune_heads 15%", ["prune_heads:fraction=0.15"]),
    ("prune_heads 33%", ["prune_heads:fraction=0.33"]),
    ("prune_ffn 15%", ["prune_ffn:fraction=0.15"]),
    ("prune_ffn 30%", ["prune_ffn:fraction=0.3"]),
    ("lowrank 10%", ["lowrank:fraction=0.1"]),
    ("lowrank 25%", ["lowrank:fraction=0.25"]),
    ("prune_heads 33% + distill", ["prune_heads:fraction=0.33", "distill"]),
    ("prune_ffn 25% + distill", ["prune_ffn:fraction=0.25", "distill"]),
    ("lowrank 20% + distill", ["lowrank:fraction=0.2", "distill"]),
    ("quantize static, budget 1-cos<=0.003", ["quantize:mode=static,budget=0.003,budget_metric=cosine"]),
    ("quantize static (all MatMuls)", ["quantize:mode=static"]),
]
DECODER_PASSES = [
    ("attention (exact, ORT fused op)", ["cleanup", "attention:target=onnxruntime"]),
    ("prune_ffn 10%", ["prune_ffn:fraction=0.1"]),
    ("prune_ffn 25%", ["prune_ffn:fraction=0.25"]),
    ("prune_ffn 25% + distill", ["prune_ffn:fraction=0.25", "distill"]),
    ("quantize dynamic int8", ["quantize:mode=dynamic"]),
    ("quantize weight_only int4 b32", ["quantize:mode=weight_only,bits=4,block_size=32"]),
]
RECIPES = {"encoder": ["lossless", "balanced", "small"], "decoder": ["lossless", "balanced", "small", "edge-int4"]}
# The automatic mode (``onnxpress compile --budget``), measured beside the recipes.
AUTO = {"encoder": [0.01, 0.02], "decoder": []}  # decoders: not benched here (every probe re-quantises the whole model)


def resolve_model(name: str) -> Path:
    from onnxpress.export import cached_export

    return Path(name) if name.endswith(".onnx") else Path(cached_export(name))


def token_range(src: Path) -> tuple[int, int]:
    """Random token ids for timing: inside the vocabulary, past the special tokens."""
    from onnxpress.calibration import vocab_size
    from onnxpress.model_io import load_model

    high = min(20000, vocab_size(load_model(src)))
    return min(1000, high // 2), high


def build_variants(src: Path, kind: str, out: Path, quick: bool, jobs: int,
                   reuse_only: bool = False, only: list[str] | None = None) -> tuple[dict[str, dict], dict]:
    """label -> {"path", "group", "compile_s"[, "error"]}; every variant (or those in ``only``, and
    ORT fp32) built from ``src``.

    A compiled variant whose report (OUT.report.json, same passes) is already in ``out`` is
    reused, so an interrupted run resumes; ``jobs`` > 1 compiles onnxpress variants in
    parallel processes (their compile times then include the contention)."""
    from concurrent.futures import ProcessPoolExecutor

    from onnxpress.calibration import CalibrationSet
    from onnxpress.compile import report_path
    from onnxpress.datasets import sotu_files
    from onnxpress.model_io import load_model

    # The peers calibrate on 128 samples (their tools hold them all in memory); every
    # onnxpress variant runs as a user runs it, with compile_model's default calibration,
    # except that --quick gives the passes-alone rows 64 samples. The recipes and the
    # automatic mode are the headline rows, so they never take that shortcut.
    samples = 64 if quick else 128
    calib = CalibrationSet.from_files(sotu_files("calibration"), src.parent, load_model(src), max_length=128,
                                      batch_size=8, max_samples=samples, seed=0)
    variants: dict[str, dict] = {"ORT fp32": {"path": src, "group": "peer", "compile_s": 0.0}}

    record = functools.partial(record_build, variants)

    for label, build in (ENCODER_PEERS if kind == "encoder" else DECODER_PEERS).items():
        if only is None or label in only:
            record(label, "peer", lambda b=build: (b(src, out, calib.batches), None))
    tasks = []  # (label, group, output, compile_model kwargs)
    for i, (label, passes) in enumerate(ENCODER_PASSES if kind == "encoder" else DECODER_PASSES):
        tasks.append((f"onnxpress {label}", "pass", out / f"pass_{i}.onnx",
                      {"passes": passes, "max_samples": samples if quick else None}))
    for recipe in RECIPES[kind]:
        tasks.append((f"onnxpress recipe {recipe}", "recipe", out / f"recipe_{recipe}.onnx",
                      {"recipe": recipe, "max_samples": None}))
    for budget in AUTO[kind]:
        tasks.append((f"onnxpress auto --budget {budget:g}", "recipe", out / f"auto_{budget:g}.onnx",
                      {"budget": budget, "objective": "latency", "max_samples": None}))
    if only is not None:
        tasks = [t for t in tasks if t[0] in only]
    if reuse_only:  # measure what an earlier (interrupted) run built; report the rest as missing
        tasks = [t for t in tasks if t[2].exists() and report_path(t[2]).exists()]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = {label: pool.submit(compile_cached, src, o, kw, THREADS) for label, _, o, kw in tasks}
        for label, group, _, _ in tasks:
            record(label, group, futures[label].result)
    return variants, {"calibration": calib.source}


def measure(src: Path, kind: str, variants: dict[str, dict], quick: bool, repeats: int, windows: int) -> list[dict]:
    from onnxpress.calibration import make_feeds
    from onnxpress.datasets import evaluation_sentences
    from onnxpress.evaluation import bbc_probe_accuracy, embedding_fidelity, perplexity
    from onnxpress.runtime import make_session

    tok = src.parent
    ok = {k: v for k, v in variants.items() if "path" in v}
    sessions = {k: make_session(v["path"], threads=THREADS) for k, v in ok.items()}
    latency = {}
    tokens = token_range(src)
    for batch in (1, 8):
        ids = np.random.default_rng(0).integers(*tokens, (batch, 128)).astype(np.int64)
        feeds = {k: make_feeds(s, ids, np.ones_like(ids)) for k, s in sessions.items()}
        latency[batch] = time_alternating({k: (lambda s=s, f=feeds[k]: s.run(None, f)) for k, s in sessions.items()},
                                          repeats=repeats, warmup=1)
    sentences = {corpus: evaluation_sentences(64 if quick else 256, corpus=corpus) for corpus in CORPORA}
    rows = []
    for label, v in variants.items():
        row = {"variant": label, "group": v["group"]}
        if "error" in v:
            rows.append({**row, "error": v["error"]})
            continue
        s = sessions[label]
        row.update(size_mb=round(model_size_mb(v["path"]), 1), compile_s=v["compile_s"],
                   b1_ms=round(latency[1][label] * 1e3, 2), b8_ms=round(latency[8][label] * 1e3, 2))
        row["b1_ratio"] = round(latency[1][label] / latency[1]["ORT fp32"], 3)
        row["b8_ratio"] = round(latency[8][label] / latency[8]["ORT fp32"], 3)
        row["size_ratio"] = round(row["size_mb"] / model_size_mb(src), 3)
        try:
            ids = np.random.default_rng(0).integers(*tokens, (8, 128)).astype(np.int64)
            row["peak_rss_mb"] = round(peak_rss_mb(v["path"], make_feeds(s, ids, np.ones_like(ids)), THREADS), 0)
        except subprocess.CalledProcessError as exc:
            row["peak_rss_mb"] = None
            row["rss_error"] = exc.stderr.strip().splitlines()[-1][:120] if exc.stderr.strip() else "failed"
        try:
            for corpus, prefix in CORPORA.items():
                if kind == "encoder":
                    fid = embedding_fidelity(s, sessions["ORT fp32"], sentences[corpus], tok)
                    row[prefix + "cos_mean"] = round(fid["embedding_cosine_mean"], 5)
                    row[prefix + "cos_min"] = round(fid["embedding_cosine_min"], 5)
                else:
                    row[prefix + "perplexity"] = round(perplexity(s, tok, max_windows=windows, corpus=corpus), 3)
            if kind == "encoder":
                probe = dict(max_train=200, max_test=100) if quick else {}
                row["bbc_probe"] = bbc_probe_accuracy(s, tok, **probe)["probe_accuracy"]
            else:
                row["tokens_per_s_b8"] = round(8 * 128 / latency[8][label], 1)
        except Exception as exc:
            row["error"] = f"evaluation: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    if kind == "decoder":
        for prefix in CORPORA.values():
            ref = next(r[prefix + "perplexity"] for r in rows if r["variant"] == "ORT fp32")
            for r in rows:
                if r.get(prefix + "perplexity"):
                    r[prefix + "ppl_vs_fp32_pct"] = round(100 * (r[prefix + "perplexity"] / ref - 1), 2)
    return rows


def pareto_plot(rows: list[dict], kind: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(18, 6.5), sharey=kind == "encoder")
    for ax, (corpus, prefix) in zip(axes, CORPORA.items(), strict=True):
        key = prefix + ("cos_mean" if kind == "encoder" else "ppl_vs_fp32_pct")
        domain = "calibration's domain (SOTU)" if corpus == "sotu" else "unseen domain (BBC News)"
        _pareto_panel(ax, rows, kind, key, domain)
    fig.suptitle(title + " (marker area = file size)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pareto_panel(ax, rows: list[dict], kind: str, key: str, domain: str) -> None:
    pts = [r for r in rows if r.get(key) is not None and r.get("b8_ms")]
    colors = {"peer": "tab:gray", "pass": "tab:blue", "recipe": "tab:red"}
    # Encoders: cosines below `floor` sit on the bottom edge, labelled with their value.
    # Decoders: symlog (linear to +10%, then decades), as broken peers reach +1e7 %.
    floor = 0.8
    shown = {id(r): max(r[key], floor) if kind == "encoder" else r[key] for r in pts}
    for group, color in colors.items():
        sel = [r for r in pts if r["group"] == group]
        ax.scatter([r["b8_ms"] for r in sel], [shown[id(r)] for r in sel], s=[4 * r["size_mb"] for r in sel], c=color,
                   alpha=0.55, label=group, edgecolors="k")
    for r in pts:
        label = r["variant"].replace("onnxpress ", "")
        if shown[id(r)] != r[key]:
            label += f" (cosine {r[key]:.2f}, below the axis)"
        ax.annotate(label, (r["b8_ms"], shown[id(r)]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    better = (lambda a, b: a >= b) if kind == "encoder" else (lambda a, b: a <= b)
    front = sorted((r for r in pts if not any(o is not r and o["b8_ms"] <= r["b8_ms"] and better(o[key], r[key])
                                             and (o["b8_ms"], o[key]) != (r["b8_ms"], r[key]) for o in pts)),
                   key=lambda r: r["b8_ms"])
    ax.plot([r["b8_ms"] for r in front], [r[key] for r in front], "k--", lw=0.8, label="Pareto front")
    ax.set_xlabel("latency, batch 8 x 128 tokens (ms, median)")
    what = "mean embedding cosine vs fp32" if kind == "encoder" else "perplexity vs fp32 (%)"
    ax.set_ylabel(f"{what}, {domain}")
    if kind == "encoder":
        ax.set_ylim(max(floor, min(r[key] for r in pts) - 0.01) - 0.005, 1.002)
    else:
        ax.set_yscale("symlog", linthresh=10)
    legend = ax.legend(loc="best", fontsize=8)
    for handle in legend.legend_handles:  # one marker size in the legend, not the last point's
        if hasattr(handle, "set_sizes"):
            handle.set_sizes([40])
    ax.grid(alpha=0.3)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["minilm"], help="minilm, smollm2, or paths to .onnx exports")
    parser.add_argument("--quick", action="store_true",
                        help="fewer calibration samples for the passes-alone rows (the recipes and the automatic mode "
                             "keep the default), fewer evaluation sentences and windows")
    parser.add_argument("--windows", type=int, help="decoders: held-out perplexity windows (default 8 quick, else 32)")
    parser.add_argument("--repeats", type=int, default=7, help="round-robin timing rounds per batch size")
    parser.add_argument("--jobs", type=int, default=1, help="onnxpress variants compiled in parallel processes")
    parser.add_argument("--only", nargs="+", metavar="VARIANT",
                        help="build and measure only these variants (labels as in the table; ORT fp32 always, for the "
                             "ratios), keeping the other rows of compare.json from the runs that measured them")
    parser.add_argument("--results", default="compare", metavar="NAME",
                        help="results/NAME.json and NAME.<model>.png (default compare): another host's rows in a file of "
                             "their own, as ratios hold only within one machine")
    parser.add_argument("--reuse-only", action="store_true",
                        help="compile nothing: measure the onnxpress variants an earlier run left in the work folder")
    args = parser.parse_args(argv)
    command = "OPENBLAS_NUM_THREADS=1 nice python bench/bench_compare.py " + shlex.join(argv or sys.argv[1:])
    from onnxpress.compile import model_kind
    from onnxpress.datasets import describe_split
    from onnxpress.model_io import load_model

    rows, notes = [], {"threads": THREADS,
                       "evaluation": {corpus: describe_split("evaluation", corpus) for corpus in CORPORA}}
    for name in args.models:
        src = resolve_model(name)
        model = Path(name).stem if name.endswith(".onnx") else name
        kind = model_kind(load_model(src))
        out = WORK / model
        out.mkdir(parents=True, exist_ok=True)
        load_start = os.getloadavg()
        print(f"# {model} ({kind}): building variants", flush=True)
        variants, info = build_variants(src, kind, out, args.quick, args.jobs, args.reuse_only, args.only)
        notes[f"{model}_calibration"] = info["calibration"]
        notes[f"{model}_machine"] = machine()  # the host of these rows (int8 speed-ups depend on its ISA)
        notes[f"{model}_jobs"] = args.jobs
        windows = args.windows or (8 if args.quick else 32)
        if kind == "decoder":
            from onnxpress.evaluation import PPL_WINDOW

            notes[f"{model}_perplexity_windows"] = f"{windows} windows of {PPL_WINDOW} held-out tokens"
        model_rows = measure(src, kind, variants, args.quick, args.repeats, windows)
        notes[f"{model}_load_average_start_end"] = [load_start, os.getloadavg()]
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        rows += [{"model": model, "kind": kind, "run": stamp, "quick": args.quick, "command": command, **r}
                 for r in model_rows]
    notes["reading"] = "latency: compare ratios (alternating runs); absolute ms depend on the load averages noted"
    columns = ["model", "variant", "size_mb", "b1_ms", "b8_ms", "b1_ratio", "b8_ratio", "tokens_per_s_b8",
               "peak_rss_mb", "cos_mean", "cos_min", "bbc_cos_mean", "bbc_cos_min", "perplexity", "ppl_vs_fp32_pct",
               "bbc_perplexity", "bbc_ppl_vs_fp32_pct", "bbc_probe", "compile_s", "error"]
    print(f"# threads {THREADS}")
    # rows not measured this time are kept: other models', and with --only the model's other variants
    # (read now: another run may have written meanwhile)
    if (RESULTS / f"{args.results}.json").exists():
        ran = {(r["model"], r["variant"]) for r in rows}
        earlier = json.loads((RESULTS / f"{args.results}.json").read_text())
        kept = [r for r in earlier["rows"] if (r["model"], r["variant"]) in ran
                or args.only is not None or r["model"] not in {m for m, _ in ran}]
        prefixes = tuple(f"{r['model']}_" for r in kept if (r["model"], r["variant"]) not in ran)
        notes = {**{k: v for k, v in earlier["notes"].items() if prefixes and k.startswith(prefixes)}, **notes}
        for kept_model in {p[:-1] for p in prefixes}:  # files written before rows named their host
            notes.setdefault(f"{kept_model}_machine", earlier["machine"])
        measured = {(r["model"], r["variant"]): r for r in rows}
        # in the earlier order, measured rows in place of their old ones, new variants after them
        rows = [measured.pop((r["model"], r["variant"]), r) for r in kept] + list(measured.values())
    for model in dict.fromkeys(r["model"] for r in rows if r["command"] == command):
        model_rows = [r for r in rows if r["model"] == model]
        pareto_plot(model_rows, model_rows[0]["kind"], f"{model} on {machine()['cpu']}, {THREADS} threads",
                    RESULTS / f"{args.results}.{model}.png")
    write_results(args.results, rows, command=command, notes=notes, columns=columns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
