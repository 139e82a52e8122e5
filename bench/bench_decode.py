"""Decoders at batch 1, as an edge user runs them: greedy generation with the KV cache.

For one decoder (default SmolLM2-135M): ORT running the fp32 export, onnxpress's decoder
recipes and weight-only variants, and the peers an edge user would try: ONNX Runtime GenAI's
model builder (fp32 and int4, built in a throwaway virtual environment: it needs a newer
transformers than the project pins), ORT's MatMulNBitsQuantizer int4 and NNCF (int8, int4
weights; a peer that fails on the model is a row with its error), all run by plain ONNX Runtime
sessions with the same threads. Each round runs every variant once,
in a new random order: prefill of a ``--prompt``-token prompt taken from held-out SOTU text,
then ``--new`` greedy steps, each one token with the cache. Columns: prefill ms and decode
tokens/s (medians over rounds; ratios against the fp32 export in the same run), how many
greedy tokens agree with the fp32 export's before the first that differs, perplexity over
held-out windows of both corpora (the same windows for every row), file size.

    OPENBLAS_NUM_THREADS=1 nice python bench/bench_decode.py [--model smollm2] [--rounds 5] [--windows 16]

Prints the table, writes ``bench/results/decode.json`` (with the host's ISA flags: int8 and
int4 speed differ several-fold between AVX2-only and AVX-512 VNNI hosts) and
``bench/results/decode.png`` (decode tokens/s against perplexity).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, compile_cached, machine, model_size_mb, peer_python, record_build, write_results  # noqa: E402
from peers import DECODER_PEERS  # noqa: E402

from onnxpress.calibration import CalibrationSet  # noqa: E402
from onnxpress.datasets import sotu_files  # noqa: E402
from onnxpress.export import CACHE_ROOT, cached_export, resolve_model_source  # noqa: E402
from onnxpress.model_io import load_model  # noqa: E402

THREADS = 2
WORK = CACHE_ROOT / "bench-decode"
GENAI = ["onnxruntime-genai==0.18.0", "transformers>=4.58"]
CORPORA = {"sotu": "", "bbc": "bbc_"}
PEERS = [label for label in DECODER_PEERS if "int4" in label or "NNCF" in label]  # the edge user's other options
RECIPES = ["balanced", "small", "edge-int4"]
PASSES = {  # weight-only options beside the recipes: what each costs and buys at decode
    "int4, LM head int8, int8 activations (accuracy_level 4)": [
        "cleanup", "attention:target=onnxruntime",
        "quantize:mode=weight_only,bits=4,block_size=32,lm_head_bits=8,accuracy_level=4"],
    "int4 with the LM head, int8 activations (accuracy_level 4)": [
        "cleanup", "attention:target=onnxruntime",
        "quantize:mode=weight_only,bits=4,block_size=32,accuracy_level=4"],
}


def genai_build(hf_dir: Path, precision: str) -> Path:
    """The model builder's CPU output for ``precision`` (fp32 or int4), built once under the cache."""
    out = WORK / f"genai-{precision}"
    model = out / "model.onnx"
    if not model.exists():
        done = subprocess.run([str(peer_python("genai", GENAI)), "-m", "onnxruntime_genai.models.builder",
                               "-i", str(hf_dir), "-o", str(out), "-p", precision, "-e", "cpu",
                               "-c", str(WORK / "genai-cache")], capture_output=True, text=True)
        if done.returncode != 0 or not model.exists():
            tail = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no output"
            raise RuntimeError(f"model builder -p {precision}: {tail}")
    return model


class Decoder:
    """Greedy generation with the KV cache through a plain ORT session, for optimum exports and
    GenAI-builder models alike (inputs: input_ids, attention_mask, [position_ids], past_key_values.*)."""

    def __init__(self, path: Path, head_dim: int):
        from onnxpress.calibration import is_past_input
        from onnxpress.evaluation import _present_name
        from onnxpress.runtime import make_session

        self.session = make_session(path, threads=THREADS)
        inputs = self.session.get_inputs()
        self.names = {i.name for i in inputs}
        self.past = {i.name: (i.shape[1], head_dim if not isinstance(i.shape[3], int) else i.shape[3],
                              np.float16 if "float16" in i.type else np.float32)
                     for i in inputs if is_past_input(i.name)}
        self.present = {name: _present_name(name) for name in self.past}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, ids: np.ndarray, start: int, cache: dict | None) -> tuple[np.ndarray, dict]:
        """Logits of ``ids`` [batch, n] at positions ``start``.., and the cache after them."""
        batch, n = ids.shape
        feeds = {"input_ids": ids, "attention_mask": np.ones((batch, start + n), np.int64)}
        if "position_ids" in self.names:
            feeds["position_ids"] = np.broadcast_to(np.arange(start, start + n, dtype=np.int64), (batch, n)).copy()
        for name, (heads, dim, dtype) in self.past.items():
            feeds[name] = cache[name] if cache else np.zeros((batch, heads, 0, dim), dtype)
        out = dict(zip(self.outputs, self.session.run(None, feeds), strict=True))
        return out["logits"], {name: out[present] for name, present in self.present.items()}

    def generate(self, prompt: np.ndarray, new: int) -> tuple[list[int], float, float]:
        """(tokens, prefill seconds, seconds of the ``new`` one-token steps after it)."""
        t0 = time.perf_counter()
        logits, cache = self.run(prompt[None], 0, None)
        tokens = [int(logits[0, -1].argmax())]
        t1 = time.perf_counter()
        for _ in range(new):
            logits, cache = self.run(np.asarray([[tokens[-1]]], np.int64), len(prompt) + len(tokens) - 1, cache)
            tokens.append(int(logits[0, -1].argmax()))
        return tokens, t1 - t0, time.perf_counter() - t1

    def perplexity(self, windows: np.ndarray) -> float:
        """onnxpress.evaluation's perplexity, through this feed builder (GenAI-builder models leave
        the cache's head size symbolic, which evaluation's feeds refuse)."""
        from onnxpress.evaluation import _log_softmax

        total, count = 0.0, 0
        for window in windows:
            log_p = _log_softmax(self.run(window[None], 0, None)[0][0, :-1])
            total -= float(log_p[np.arange(len(window) - 1), window[1:]].sum())
            count += len(window) - 1
        return float(np.exp(total / count))


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def build_variants(src: Path, hf_dir: Path) -> dict[str, dict]:
    variants: dict[str, dict] = {"ORT fp32 (optimum export)": {"path": src, "group": "peer", "compile_s": 0.0}}

    record = functools.partial(record_build, variants)
    for precision in ("fp32", "int4"):
        record(f"GenAI builder {precision}", "peer", lambda p=precision: (genai_build(hf_dir, p), None))
    calib = CalibrationSet.from_files(sotu_files("calibration"), src.parent, load_model(src), max_length=128,
                                      batch_size=8, max_samples=128, seed=0)  # the peers' samples in bench_compare
    for label in PEERS:
        record(label, "peer", lambda b=DECODER_PEERS[label]: (b(src, WORK, calib.batches), None))
    for recipe in RECIPES:
        record(f"onnxpress {recipe}", "recipe",
               lambda r=recipe: compile_cached(src, WORK / f"recipe_{r}.onnx", {"recipe": r, "max_samples": None},
                                               THREADS))
    for i, (label, passes) in enumerate(PASSES.items()):
        record(f"onnxpress {label}", "pass",
               lambda p=passes, i=i: compile_cached(src, WORK / f"pass_{i}.onnx", {"passes": p, "max_samples": None},
                                                    THREADS))
    return variants


def measure(variants: dict[str, dict], tokenizer_dir: Path, head_dim: int, *, prompt_len: int, new: int,
            rounds: int, windows: int) -> list[dict]:
    from onnxpress.evaluation import perplexity_windows

    ok = {label: v for label, v in variants.items() if "path" in v}
    decoders = {label: Decoder(v["path"], head_dim) for label, v in ok.items()}
    prompt = perplexity_windows(tokenizer_dir, window=prompt_len, max_windows=1)[0]
    samples: dict[str, list[tuple[float, float]]] = {label: [] for label in decoders}
    tokens = {}
    for label, d in decoders.items():  # warm-up, and the greedy tokens
        tokens[label] = d.generate(prompt, new)[0]
    rng, order = random.Random(0), list(decoders)
    for _ in range(rounds):
        rng.shuffle(order)
        for label in order:
            samples[label].append(decoders[label].generate(prompt, new)[1:])
    held_out = {corpus: perplexity_windows(tokenizer_dir, max_windows=windows, corpus=corpus) for corpus in CORPORA}
    reference = "ORT fp32 (optimum export)"
    rows = []
    for label, v in variants.items():
        row = {"variant": label, "group": v["group"]}
        if "error" in v:
            rows.append({**row, "error": v["error"]})
            continue
        prefill = statistics.median(s[0] for s in samples[label])
        decode = statistics.median(s[1] for s in samples[label])
        row.update(size_mb=round(model_size_mb(v["path"]), 1), compile_s=v["compile_s"], prefill_ms=round(prefill * 1e3, 1),
                   decode_tokens_per_s=round(new / decode, 1),
                   greedy_prefix_as_fp32=common_prefix(tokens[label], tokens[reference]))
        for corpus, prefix in CORPORA.items():
            row[prefix + "perplexity"] = round(decoders[label].perplexity(held_out[corpus]), 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
    base = next(r for r in rows if r["variant"] == reference)
    for r in rows:
        if "error" in r:
            continue
        r["decode_vs_fp32"] = round(r["decode_tokens_per_s"] / base["decode_tokens_per_s"], 2)
        r["prefill_vs_fp32"] = round(r["prefill_ms"] / base["prefill_ms"], 2)
        for prefix in CORPORA.values():
            r[prefix + "ppl_vs_fp32_pct"] = round(100 * (r[prefix + "perplexity"] / base[prefix + "perplexity"] - 1), 2)
    return rows


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for ax, (corpus, prefix) in zip(axes, CORPORA.items(), strict=True):
        for r in rows:
            if "error" in r:
                continue
            color = "tab:gray" if r["group"] == "peer" else "tab:blue"
            ax.scatter(r[prefix + "ppl_vs_fp32_pct"], r["decode_tokens_per_s"], s=20 + r["size_mb"] / 2, color=color,
                       alpha=0.7)
            ax.annotate(r["variant"], (r[prefix + "ppl_vs_fp32_pct"], r["decode_tokens_per_s"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel(f"perplexity vs fp32, % ({corpus} held-out)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("decode tokens/s, batch 1")
    fig.suptitle(title + " (marker area: file size; grey: peers)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="a packaged decoder (default smollm2)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (prefill)")
    parser.add_argument("--new", type=int, default=64, help="greedy one-token decode steps after the prefill")
    parser.add_argument("--rounds", type=int, default=5, help="round-robin timing rounds")
    parser.add_argument("--windows", type=int, default=16, help="held-out perplexity windows per corpus")
    args = parser.parse_args(argv)
    command = "OPENBLAS_NUM_THREADS=1 nice python bench/bench_decode.py " + " ".join(argv or sys.argv[1:])
    from onnxpress.datasets import describe_split
    from onnxpress.evaluation import PPL_WINDOW

    WORK.mkdir(parents=True, exist_ok=True)
    src, hf_dir = Path(cached_export(args.model)), resolve_model_source(args.model)
    config = json.loads((hf_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    variants = build_variants(src, hf_dir)
    load_start = os.getloadavg()
    rows = measure(variants, src.parent, head_dim, prompt_len=args.prompt, new=args.new, rounds=args.rounds,
                   windows=args.windows)
    rows = [{"model": args.model, **r} for r in rows]
    notes = {
        "threads": THREADS, "batch": 1, "prompt_tokens": args.prompt, "new_tokens": args.new, "rounds": args.rounds,
        "timing": "medians over round-robin rounds in one process; prefill: the prompt in one call; decode: the "
                  "one-token steps after it, each feeding the cache back",
        "perplexity": f"{args.windows} windows of {PPL_WINDOW} tokens per corpus, the same for every row",
        "evaluation": {corpus: describe_split("evaluation", corpus) for corpus in CORPORA},
        "calibration": "onnxpress variants: --calib sotu",
        "genai_builder": " ".join(GENAI) + f", -p fp32|int4 -e cpu, in {WORK.parent / 'bench-venvs' / 'genai'}",
        "load_average_start_end": [load_start, os.getloadavg()],
    }
    columns = ["variant", "size_mb", "prefill_ms", "prefill_vs_fp32", "decode_tokens_per_s", "decode_vs_fp32",
               "greedy_prefix_as_fp32", "ppl_vs_fp32_pct", "bbc_ppl_vs_fp32_pct", "perplexity", "bbc_perplexity",
               "compile_s", "error"]
    write_results("decode", rows, command=command, notes=notes, columns=columns)
    plot(rows, f"{args.model} on {machine()['cpu']}, {THREADS} threads, batch 1", RESULTS / "decode.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
