"""Structured-pruning benchmark: attention heads and FFN neurons, chosen on
calibration data and repaired by least squares, against naive weight-norm pruning and
onnxsim 0.8.1's ``apply_attention_head_pruning``.

MiniLM (all-MiniLM-L6-v2): held-out mean sentence-embedding cosine vs fp32 at 33% of
heads and at 25% of FFN neurons removed; both together: ONNX Runtime latency at batch
8 x 128 tokens (2 threads, medians of alternating runs in this process) as a ratio to
the unpruned model, and BBC topic-probe accuracy beside fp32's. SmolLM2-135M: 25% of
FFN neurons, and one KV group in three: perplexity on held-out SOTU text and a greedy
generation (20 tokens) through the KV cache.

Data: calibration = sentences of SOTU speeches before 1950, evaluation = SOTU
speeches from 1990 on (``onnxpress.datasets``; disjoint files); BBC probe: its fixed
train/test split.

    OPENBLAS_NUM_THREADS=1 nice python bench/bench_prune.py [--quick] [--skip-smollm]

Prints one table and writes ``bench/results/prune.json`` (all rows from one run).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import write_results  # noqa: E402

from onnxpress.runtime import time_alternating  # noqa: E402

THREADS = 2
# calibrated contribution, ridge least-squares repair, layers' shares by their own error (the
# encoders' default since, probing, is measured by the compile commands in the README)
OURS = {"allocation": "global"}
NAIVE = {"score": "weight_norm", "repair": False, "allocation": "global"}


def _models():
    from conftest import export_minilm, export_smollm2  # the cached optimum exports the tests use

    return export_minilm, export_smollm2


def _calibration(model, tok_dir, samples: int, *, sentences: bool, max_length: int, batch_size: int):
    from onnxpress import datasets
    from onnxpress.calibration import CalibrationSet

    files = datasets.sotu_files("calibration")
    if sentences:  # the evaluation text is single sentences: calibrate on the same kind of input
        pool = [s for f in files for s in datasets.split_sentences(datasets.read_text(f), min_chars=40)]
        return CalibrationSet.from_texts(pool, tok_dir, model, max_length=max_length, batch_size=batch_size,
                                         max_samples=samples, seed=0, source="SOTU calibration split sentences")
    return CalibrationSet.from_files(files, tok_dir, model, max_length=max_length, batch_size=batch_size,
                                     max_samples=samples, seed=0)


def _prune(src: Path, passes: list[tuple[str, dict]], calib, out: Path):
    """Run the pruning passes (with the pass manager's checks) and save; returns (path, results)."""
    from onnxpress.model_io import load_model, save_model
    from onnxpress.pass_infra import build_pass
    from onnxpress.pipeline import CompileContext, Pipeline

    model = load_model(src)
    cal, held = calib.split(0.05)
    ctx = CompileContext(verification=held.batches[:2], calibration=cal, threads=THREADS)
    t0 = time.perf_counter()
    results = Pipeline([build_pass(n, dict(s)) for n, s in passes], progress=False).run(model, ctx)
    seconds = time.perf_counter() - t0
    save_model(model, out)
    return out, results, seconds


def _heads(path) -> tuple[int, int]:
    from onnxpress.analysis import analyze
    from onnxpress.model_io import load_model

    t = analyze(load_model(path))
    return sum(a.num_heads for a in t.attentions()), sum(a.num_kv_heads for a in t.attentions())


def _fused_heads(proto) -> int:
    return sum(next((a.i for a in n.attribute if a.name == "num_heads"), 0) for n in proto.graph.node
               if n.op_type in ("Attention", "MultiHeadAttention"))


def _latency_feeds(session, tok_dir):
    from onnxpress import datasets
    from onnxpress.calibration import make_feeds
    from onnxpress.datasets import load_tokenizer

    tokenizer = load_tokenizer(tok_dir)
    text = " ".join(datasets.evaluation_sentences(64))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: 8 * 128]
    ids = np.asarray(ids, dtype=np.int64).reshape(8, 128)
    return make_feeds(session, ids, np.ones_like(ids))


def bench_minilm(args, rows, notes, tmp: Path):
    import onnx
    import onnxsim
    from onnxruntime.transformers.optimizer import optimize_model

    from onnxpress import datasets
    from onnxpress.evaluation import bbc_probe_accuracy, sentence_embeddings
    from onnxpress.fidelity import row_cosines
    from onnxpress.model_io import load_model
    from onnxpress.runtime import make_session

    src = _models()[0]()
    tok = src.parent
    calib = _calibration(load_model(src), tok, args.minilm_calib, sentences=True, max_length=128, batch_size=32)
    sentences = datasets.evaluation_sentences(args.eval_sentences)
    notes["minilm_calibration"] = calib.source
    notes["minilm_evaluation"] = f"{len(sentences)} sentences, {datasets.describe_split('evaluation')}"
    ref = sentence_embeddings(make_session(src, threads=THREADS), tok, sentences)

    def cosine(model) -> tuple[float, float]:
        cos = row_cosines(ref, sentence_embeddings(make_session(model, threads=THREADS), tok, sentences))
        return float(cos.mean()), float(cos.min())

    def row(label, path_or_proto, params=None, seconds=None, heads=None, **extra):
        mean, low = cosine(path_or_proto)
        rows.append({"model": "MiniLM", "variant": label, "heads": heads, "cos_mean": mean, "cos_min": low,
                     "params": params, "prune_s": seconds, **extra})
        print(f"  {label}: cos {mean:.4f} (min {low:.4f})", flush=True)

    heads0, _ = _heads(src)
    row("fp32", src, heads=f"{heads0}")

    # heads, 33%: ours vs naive (same pass, weight-norm choice, no repair)
    variants = [("heads 33%: calibrated+global+LS repair", "heads_ours", [("prune_heads", {"fraction": 0.33, **OURS})]),
                ("heads 33%: weight norm, no repair", "heads_naive", [("prune_heads", {"fraction": 0.33, **NAIVE})]),
                ("heads 33%: weight norm uniform, no repair", "heads_naive_u",
                 [("prune_heads", {"fraction": 0.33, **NAIVE, "allocation": "uniform"})]),
                ("ffn 25%: calibrated+global+LS repair", "ffn_ours", [("prune_ffn", {"fraction": 0.25, **OURS})]),
                ("ffn 25%: weight norm, no repair", "ffn_naive", [("prune_ffn", {"fraction": 0.25, **NAIVE})]),
                ("heads 33% + ffn 25% (ours)", "both", [("prune_heads", {"fraction": 0.33, **OURS}),
                                                        ("prune_ffn", {"fraction": 0.25, **OURS})])]
    paths = {}
    for label, key, passes in variants:
        path, results, seconds = _prune(src, passes, calib, tmp / f"minilm_{key}.onnx")
        paths[key] = path
        h, _ = _heads(path)
        row(label, path, params=results[-1].params_after, seconds=round(seconds, 1), heads=f"{h}/{heads0}",
            reported_rel_l2=results[-1].error)

    # onnxsim 0.8.1 on ORT's fused graph (its head pruning matches fused Attention ops)
    fused = optimize_model(str(src), model_type="bert", num_heads=12, hidden_size=384).model
    onnx.save(fused, tmp / "minilm_fused.onnx")
    row("ORT-fused fp32 (onnxsim input)", tmp / "minilm_fused.onnx", heads=f"{_fused_heads(fused)}")
    sparsity = 4 / 12  # 4 of 12 heads per layer: the same 24 of 72 heads as ours
    t0 = time.perf_counter()
    pruned = onnxsim.apply_attention_head_pruning(fused, sparsity=sparsity)
    seconds = time.perf_counter() - t0
    onnx.save(pruned, tmp / "minilm_onnxsim.onnx")
    row(f"heads 33%: onnxsim apply_attention_head_pruning(sparsity={sparsity:.3f})", tmp / "minilm_onnxsim.onnx",
        seconds=round(seconds, 1), heads=f"{_fused_heads(pruned)}/{_fused_heads(fused)}")

    # latency and probe: fp32 vs heads+ffn
    base, both = make_session(src, threads=THREADS), make_session(paths["both"], threads=THREADS)
    feeds = _latency_feeds(base, tok)
    times = time_alternating({"fp32": lambda: base.run(None, feeds), "both": lambda: both.run(None, feeds)},
                             repeats=args.repeats, warmup=2)
    probe0 = bbc_probe_accuracy(base, tok)["probe_accuracy"]
    probe1 = bbc_probe_accuracy(both, tok)["probe_accuracy"]
    for r in rows:
        if r["model"] == "MiniLM" and r["variant"] == "fp32":
            r.update(latency_ratio=1.0, latency_ms=times["fp32"] * 1e3, bbc_probe=probe0)
        if r["model"] == "MiniLM" and r["variant"] == "heads 33% + ffn 25% (ours)":
            r.update(latency_ratio=times["both"] / times["fp32"], latency_ms=times["both"] * 1e3, bbc_probe=probe1)
    print(f"  latency both/fp32 {times['both'] / times['fp32']:.3f}; probe {probe0:.3f} -> {probe1:.3f}", flush=True)


def bench_smollm(args, rows, notes, tmp: Path):
    from onnxpress import datasets
    from onnxpress.evaluation import generate_greedy, perplexity_windows, window_nll
    from onnxpress.model_io import load_model
    from onnxpress.runtime import make_session

    src = _models()[1]()
    tok = src.parent
    calib = _calibration(load_model(src), tok, args.smollm_calib, sentences=False, max_length=128, batch_size=8)
    windows = perplexity_windows(tok, max_windows=args.ppl_windows)
    notes["smollm_calibration"] = calib.source
    notes["smollm_evaluation"] = f"{len(windows)} windows of 256 tokens, {datasets.describe_split('evaluation')}"
    prompt = "The state of the union is"

    def row(label, path, seconds=None, params=None, **extra):
        session = make_session(path, threads=THREADS)
        nll, count = window_nll(session, windows)
        text_ids = generate_greedy(session, tok, prompt, max_new_tokens=20)
        from onnxpress.datasets import load_tokenizer

        text = load_tokenizer(tok).decode(text_ids)
        h, kv = _heads(path)
        rows.append({"model": "SmolLM2-135M", "variant": label, "heads": f"{h} ({kv} kv)",
                     "perplexity": float(np.exp(nll / count)), "params": params, "prune_s": seconds,
                     "generated_tokens": len(text_ids), "generation": text, **extra})
        print(f"  {label}: ppl {np.exp(nll / count):.3f}; {prompt!r} -> {text!r}", flush=True)

    row("fp32", src)
    for label, key, passes in [
        ("ffn 25%: calibrated+global+LS repair", "ffn", [("prune_ffn", {"fraction": 0.25})]),
        ("1 KV group in 3: calibrated+global+LS repair", "kv", [("prune_heads", {"fraction": 1 / 3})]),
        ("1 KV group in 3: weight norm, no repair", "kv_naive", [("prune_heads", {"fraction": 1 / 3, **NAIVE})]),
    ]:
        path, results, seconds = _prune(src, passes, calib, tmp / f"smollm_{key}.onnx")
        row(label, path, seconds=round(seconds, 1), params=results[-1].params_after, reported_rel_l2=results[-1].error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run, not the numbers)")
    parser.add_argument("--skip-smollm", action="store_true")
    parser.add_argument("--skip-minilm", action="store_true")
    args = parser.parse_args()
    args.minilm_calib = 128 if args.quick else 1024
    args.smollm_calib = 32 if args.quick else 256
    args.eval_sentences = 128 if args.quick else 512
    args.ppl_windows = 8 if args.quick else 48
    args.repeats = 5 if args.quick else 20
    rows: list[dict] = []
    notes: dict = {"threads": THREADS, "latency_input": "batch 8 x 128 tokens (SOTU evaluation text)"}
    with tempfile.TemporaryDirectory(prefix="bench_prune_") as tmp:
        if not args.skip_minilm:
            bench_minilm(args, rows, notes, Path(tmp))
        if not args.skip_smollm:
            bench_smollm(args, rows, notes, Path(tmp))
    command = "OPENBLAS_NUM_THREADS=1 nice python bench/bench_prune.py" + "".join(
        f" --{k.replace('_', '-')}" for k in ("quick", "skip_smollm", "skip_minilm") if getattr(args, k))
    columns = ["model", "variant", "heads", "cos_mean", "cos_min", "perplexity", "latency_ratio", "latency_ms",
               "bbc_probe", "reported_rel_l2", "params", "prune_s", "generated_tokens"]
    write_results("prune", rows, command=command, notes=notes, columns=columns)


if __name__ == "__main__":
    main()
