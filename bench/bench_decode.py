"""Decoders at batch 1, as an edge user runs them: greedy generation with the KV cache.

For one decoder (default SmolLM2-135M): ORT running the fp32 export, onnxpress's decoder
recipes and weight-only variants, and the peers an edge user would try: ONNX Runtime GenAI's
model builder (fp32 and int4, built in a throwaway virtual environment: it needs a newer
transformers than the project pins), ORT's MatMulNBitsQuantizer int4 and NNCF (int8, int4
weights; a peer that fails on the model is a row with its error), all run by plain ONNX Runtime
sessions with the same threads. Each round runs every variant once,
in a new random order: prefill of a ``--prompt``-token prompt taken from held-out SOTU text,
then ``--new`` greedy steps, each one token with the cache. Columns: prefill ms and decode
tokens/s (medians over rounds; ratios against the fp32 export in the same run), memory (the
peak RSS of a fresh process that loads the variant and reads the prompt, less that of the same
process loading nothing), how many
greedy tokens agree with the fp32 export's before the first that differs, perplexity over
held-out windows of both corpora (the same windows for every row) fed in one call and fed
``STEP`` tokens per call through the KV cache (``stepped``: the kernels decode steps run,
where a graph takes prompts and decode steps apart, quantize's ``prefill_path``), file size. For each recipe
row, whether the runtimes users run decoders on load it from a folder with the files
``onnxpress.runtime_files`` writes (onnxruntime-genai, optimum's ORTModelForCausalLM) and
whether their greedy tokens equal ours (``genai_same_tokens``, ``optimum_same_tokens``); and, for
those rows and the GenAI builder's, prefill ms and decode tokens/s in onnxruntime-genai's own loop
(``genai_*``: each folder's genai_config, its cache buffers shared between past and present
where it says so, at the same threads), timed round-robin as above.

    OPENBLAS_NUM_THREADS=1 nice python bench/bench_decode.py [--model smollm2] [--rounds 5] [--windows 16]
    python bench/bench_decode.py --runtimes-only   # only the runtime check, from the cached compiles

Prints the table, writes ``bench/results/decode.json`` (with the host's ISA flags: int8 and
int4 speed differ several-fold between AVX2-only and AVX-512 VNNI hosts) and
``bench/results/decode.png`` (decode tokens/s against the stepped perplexity).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS,
    compile_cached,
    format_table,
    machine,
    model_size_mb,
    peak_rss_mb,
    peer_python,
    record_build,
    write_results,
)
from peers import DECODER_PEERS  # noqa: E402

from onnxpress.calibration import CalibrationSet  # noqa: E402
from onnxpress.datasets import sotu_files  # noqa: E402
from onnxpress.export import CACHE_ROOT, _version, cached_export, resolve_model_source  # noqa: E402
from onnxpress.generation import DecoderRunner, eos_token_ids  # noqa: E402
from onnxpress.model_io import load_model  # noqa: E402
from onnxpress.passes.quantize.prefill_path import PrefillPathConfig  # noqa: E402
from onnxpress.runtime_files import genai_runner, optimum_runner, write_runtime_files  # noqa: E402

THREADS = 2
WORK = CACHE_ROOT / "bench-decode"
GENAI = ["onnxruntime-genai==0.18.0", "transformers>=4.58"]
CORPORA = {"sotu": "", "bbc": "bbc_"}
PEERS = [label for label in DECODER_PEERS if "int4" in label or "NNCF" in label]  # the edge user's other options
RECIPES = ["balanced", "small", "edge-int4"]
STEP = PrefillPathConfig.max_decode_tokens  # tokens per call of the stepped perplexity: decode steps' kernels
PASSES = {  # edge-int4 with one choice changed: what each costs and buys at decode
    "edge-int4 with a 4-bit LM head (and embedding)": [
        "cleanup", "attention:target=onnxruntime", "fuse",
        "quantize:mode=weight_only,bits=4,block_size=32,accuracy_level=4,outer_roles=[down],outer_bits=8,"
        "outer_block_size=64,float16_scales=true", "prefill_path"],
    "edge-int4 with a 4-bit LM head in blocks of 16, its first 4,096 rows int8": [
        "cleanup", "attention:target=onnxruntime", "fuse",
        "quantize:mode=weight_only,bits=4,block_size=32,accuracy_level=4,outer_roles=[down],outer_bits=8,"
        "outer_block_size=64,float16_scales=true,lm_head_bits=4,lm_head_block_size=16,lm_head_int8_rows=4096",
        "prefill_path"],
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


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def bench_prompt(tokenizer_dir: Path, prompt_len: int) -> np.ndarray:
    """The prompt every row decodes after: the first ``prompt_len`` tokens of held-out SOTU text."""
    from onnxpress.evaluation import perplexity_windows

    return perplexity_windows(tokenizer_dir, window=prompt_len, max_windows=1)[0]


def runtime_folder(compiled: Path) -> Path:
    """``compiled`` (and its external data) hard-linked into a folder of its own under WORK/runtimes,
    where its runtime files can go (the compile cache holds several models in one folder)."""
    folder = WORK / "runtimes" / compiled.stem
    folder.mkdir(parents=True, exist_ok=True)
    for f in compiled.parent.glob(compiled.name + "*"):
        target = folder / f.name
        if target.exists() and os.path.samefile(target, f):
            continue
        target.unlink(missing_ok=True)
        try:
            os.link(f, target)
        except OSError:  # another file system
            shutil.copy2(f, target)
    return folder / compiled.name


def check_runtimes(compiled: Path, src_dir: Path, prompt: np.ndarray, new: int) -> dict:
    """Whether onnxruntime-genai and optimum load ``compiled`` from a folder with its runtime files, and
    whether their greedy tokens after ``prompt`` (new + 1 at most, stopping on the same eos ids) equal
    onnxpress's own loop's."""
    model = runtime_folder(compiled)
    write_runtime_files(model, source_dir=src_dir)
    eos = sorted(eos_token_ids(model.parent))
    ours = DecoderRunner(model, threads=THREADS).generate(prompt, new + 1, eos_ids=eos).tokens
    row: dict = {}
    for name, load in (("genai", lambda: genai_runner(model.parent)), ("optimum", lambda: optimum_runner(model, eos))):
        try:
            run = load()
            row[f"{name}_loads"] = True
            theirs = run(prompt.tolist(), new + 1)
            row[f"{name}_same_tokens"] = theirs == ours
            row[f"{name}_greedy_prefix"] = common_prefix(theirs, ours)
        except Exception as exc:  # a runtime failing on the folder is a result
            row.setdefault(f"{name}_loads", False)
            row[f"{name}_error"] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:160]}"
        print(f"  {compiled.name} in {name}: {row.get(f'{name}_same_tokens', row.get(f'{name}_error'))}", flush=True)
    row["genai_tokenizer_same_ids"] = genai_tokenizer_agrees(model.parent, prompt)
    return row


def genai_tokenizer_agrees(folder: Path, prompt: np.ndarray) -> bool | str:
    """Whether onnxruntime-genai's tokenizer, loaded from ``folder``, encodes the prompt's text to the ids the
    Hugging Face tokenizer of the same files gives (or its error)."""
    from onnxpress.datasets import load_tokenizer

    try:
        import onnxruntime_genai as og

        genai = og.Tokenizer(og.Model(str(folder)))
        hf = load_tokenizer(folder)
        text = hf.decode(prompt.tolist())
        return [int(i) for i in genai.encode(text)] == hf(text)["input_ids"]
    except Exception as exc:
        return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:160]}"


def runtime_rows(rows: list[dict], src_dir: Path, prompt: np.ndarray, new: int, rounds: int) -> list[dict]:
    """``rows`` with each recipe row's ``check_runtimes`` columns, from its cached compile, and the
    ``genai_timings`` of the recipe rows and the GenAI builder's."""
    out, folders = [], {}
    for row in rows:
        row = {k: v for k, v in row.items() if not k.startswith(("genai_", "optimum_", "runtime_"))}
        if row["group"] == "recipe" and "error" not in row:
            compiled = WORK / f"recipe_{row['variant'].removeprefix('onnxpress ')}.onnx"
            if compiled.exists():
                row.update(check_runtimes(compiled, src_dir, prompt, new))
                if row.get("genai_loads"):
                    folders[row["variant"]] = runtime_folder(compiled).parent
            else:
                row["runtime_error"] = f"no cached compile {compiled}: run the bench without --runtimes-only"
        elif row["variant"].startswith("GenAI builder") and "error" not in row:
            folders[row["variant"]] = WORK / f"genai-{row['variant'].split()[-1]}"
        out.append(row)
    timings = genai_timings(folders, prompt, new, rounds)
    for row in out:
        row.update(timings.get(row["variant"], {}))
    return out


def genai_timings(folders: dict[str, Path], prompt: np.ndarray, new: int, rounds: int) -> dict[str, dict]:
    """Prefill ms and decode tokens/s in onnxruntime-genai's own loop (greedy, ``new`` tokens after
    ``prompt``, each folder's genai_config with its cache buffers shared or not, at ``THREADS``
    threads as every other row: the configs leave the count to ONNX Runtime's default, at which a
    2-core VM decoded about 1.7x slower), medians over round-robin rounds in a new random order each."""
    import onnxruntime_genai as og

    threads = json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": THREADS}}}})
    models = {}
    for label, folder in folders.items():
        config = og.Config(str(folder))
        config.overlay(threads)
        models[label] = og.Model(config)
    samples: dict[str, list[tuple[float, float]]] = {label: [] for label in models}
    ids = prompt.astype(np.int32)
    rng, order = random.Random(0), list(models)
    for i in range(rounds + 1):  # the first round warms up
        rng.shuffle(order)
        for label in order:
            params = og.GeneratorParams(models[label])
            params.set_search_options(max_length=len(ids) + new, min_length=len(ids) + new)
            generator = og.Generator(models[label], params)
            start = time.perf_counter()
            generator.append_tokens(ids)
            prompted = time.perf_counter()
            for _ in range(new):
                generator.generate_next_token()
            if i:
                samples[label].append((prompted - start, (time.perf_counter() - prompted) / new))
    out = {}
    for label, folder in folders.items():
        config = json.loads((folder / "genai_config.json").read_text())
        out[label] = {"genai_prefill_ms": round(1e3 * statistics.median(s[0] for s in samples[label]), 1),
                      "genai_decode_tokens_per_s": round(1 / statistics.median(s[1] for s in samples[label]), 1),
                      "genai_shared_buffer": config["search"].get("past_present_share_buffer", False)}
    return out


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
    from onnxpress.evaluation import perplexity_windows, window_nll

    ok = {label: v for label, v in variants.items() if "path" in v}
    # head_size: GenAI-builder models leave the cache's head size symbolic
    decoders = {label: DecoderRunner(v["path"], threads=THREADS, head_size=head_dim) for label, v in ok.items()}
    prompt = bench_prompt(tokenizer_dir, prompt_len)
    samples: dict[str, list[tuple[float, float]]] = {label: [] for label in decoders}
    tokens = {}
    for label, d in decoders.items():  # warm-up, and the greedy tokens
        tokens[label] = d.generate(prompt, new + 1).tokens
    rng, order = random.Random(0), list(decoders)
    for _ in range(rounds):
        rng.shuffle(order)
        for label in order:
            done = decoders[label].generate(prompt, new + 1)
            samples[label].append((done.prefill_seconds, done.decode_seconds))
    held_out = {corpus: perplexity_windows(tokenizer_dir, max_windows=windows, corpus=corpus) for corpus in CORPORA}
    reference = "ORT fp32 (optimum export)"
    baseline_mb = peak_rss_mb("-", {}, THREADS)
    rows = []
    for label, v in variants.items():
        row = {"variant": label, "group": v["group"]}
        if "error" in v:
            rows.append({**row, "error": v["error"]})
            continue
        prefill = statistics.median(s[0] for s in samples[label])
        decode = statistics.median(s[1] for s in samples[label])
        memory = peak_rss_mb(v["path"], decoders[label].feeds(prompt[None]), THREADS) - baseline_mb
        row.update(size_mb=round(model_size_mb(v["path"]), 1), compile_s=v["compile_s"], prefill_ms=round(prefill * 1e3, 1),
                   peak_rss_mb=round(memory),
                   decode_tokens_per_s=round(new / decode, 1),
                   greedy_prefix_as_fp32=common_prefix(tokens[label], tokens[reference]))
        for corpus, prefix in CORPORA.items():
            for kind, chunk in (("", None), ("stepped_", STEP)):
                total, count = window_nll(decoders[label], held_out[corpus], batch_size=1, chunk=chunk)
                row[prefix + kind + "perplexity"] = round(float(np.exp(total / count)), 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
    base = next(r for r in rows if r["variant"] == reference)
    for r in rows:
        if "error" in r:
            continue
        r["decode_vs_fp32"] = round(r["decode_tokens_per_s"] / base["decode_tokens_per_s"], 2)
        r["prefill_vs_fp32"] = round(r["prefill_ms"] / base["prefill_ms"], 2)
        for prefix in CORPORA.values():
            for kind in ("", "stepped_"):
                r[prefix + kind + "ppl_vs_fp32_pct"] = round(
                    100 * (r[prefix + kind + "perplexity"] / base[prefix + kind + "perplexity"] - 1), 2)
    return rows


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for ax, (corpus, prefix) in zip(axes, CORPORA.items(), strict=True):
        passes = 0
        for r in rows:
            if "error" in r:
                continue
            color = "tab:gray" if r["group"] == "peer" else "tab:blue"
            ax.scatter(r[prefix + "stepped_ppl_vs_fp32_pct"], r["decode_tokens_per_s"], s=20 + r["size_mb"] / 2, color=color,
                       alpha=0.7)
            label = re.sub(r"( \(|, ).*$", "", r["variant"].removeprefix("onnxpress "))  # the table has the rest
            # the variants sit close together and to the recipe they vary: their labels go below, stacked
            passes += r["group"] == "pass"
            ax.annotate(label, (r[prefix + "stepped_ppl_vs_fp32_pct"], r["decode_tokens_per_s"]), fontsize=7,
                        xytext=(4, 4 - 10 * passes if r["group"] == "pass" else 4), textcoords="offset points")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel(f"perplexity vs fp32, % ({corpus} held-out, {STEP} tokens per call)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("decode tokens/s, batch 1")
    fig.suptitle(title + " (marker area: file size; grey: peers)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


COLUMNS = ["variant", "size_mb", "peak_rss_mb", "prefill_ms", "prefill_vs_fp32", "decode_tokens_per_s", "decode_vs_fp32",
           "greedy_prefix_as_fp32", "ppl_vs_fp32_pct", "bbc_ppl_vs_fp32_pct", "stepped_ppl_vs_fp32_pct",
           "bbc_stepped_ppl_vs_fp32_pct", "perplexity", "bbc_perplexity",
           "genai_same_tokens", "optimum_same_tokens", "genai_decode_tokens_per_s", "genai_prefill_ms", "compile_s",
           "error"]


def runtimes_note(new: int) -> str:
    return (f"recipe rows: the cached compile hard-linked into {WORK / 'runtimes'}/NAME/ with the files "
            "onnxpress.runtime_files writes; genai_* / optimum_*: onnxruntime-genai "
            f"{_version('onnxruntime-genai')} and optimum-onnx {_version('optimum-onnx')} loaded that folder "
            f"and greedy-decoded at most {new + 1} tokens after the prompt, stopping on the eos ids; "
            "same_tokens: equal to onnxpress.generation's loop on the same file; genai_tokenizer_same_ids: "
            "GenAI's tokenizer encodes the prompt's text to the Hugging Face tokenizer's ids; genai_prefill_ms, "
            "genai_decode_tokens_per_s: medians over the bench's rounds of onnxruntime-genai's own greedy loop "
            f"(the prompt, then {new} tokens) on the recipe folders and the GenAI builder's, round-robin, "
            f"intra_op_num_threads {THREADS}; "
            "genai_shared_buffer: the folder's past_present_share_buffer")


def merge_runtimes(src: Path, command: str) -> int:
    """--runtimes-only: the runtime columns of the recipe rows in decode.json, re-checked from the cached
    compiles; the rest of the file (rows, timings, the command that timed them) stays as it was."""
    path = RESULTS / "decode.json"
    data = json.loads(path.read_text())
    new = data["notes"]["new_tokens"]
    data["rows"] = runtime_rows(data["rows"], src.parent, bench_prompt(src.parent, data["notes"]["prompt_tokens"]), new,
                                data["notes"]["rounds"])
    data["notes"]["runtimes"] = runtimes_note(new)
    data["notes"]["runtimes_command"] = command
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)
    print(format_table([r for r in data["rows"] if r["group"] == "recipe" or "genai_decode_tokens_per_s" in r],
                       ["variant", "genai_loads", "genai_same_tokens", "genai_greedy_prefix", "optimum_loads",
                        "optimum_same_tokens", "optimum_greedy_prefix", "genai_tokenizer_same_ids",
                        "genai_decode_tokens_per_s", "genai_prefill_ms", "genai_shared_buffer", "genai_error",
                        "optimum_error", "runtime_error"]))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="a packaged decoder (default smollm2)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (prefill)")
    parser.add_argument("--new", type=int, default=64, help="greedy one-token decode steps after the prefill")
    parser.add_argument("--rounds", type=int, default=5, help="round-robin timing rounds")
    parser.add_argument("--windows", type=int, default=16, help="held-out perplexity windows per corpus")
    parser.add_argument("--runtimes-only", action="store_true",
                        help="only check that onnxruntime-genai and optimum load each cached recipe compile and decode "
                        "its greedy tokens; merged into the existing results without timing anything")
    args = parser.parse_args(argv)
    command = "OPENBLAS_NUM_THREADS=1 nice python bench/bench_decode.py " + " ".join(argv or sys.argv[1:])
    from onnxpress.datasets import describe_split
    from onnxpress.evaluation import PPL_WINDOW

    WORK.mkdir(parents=True, exist_ok=True)
    src, hf_dir = Path(cached_export(args.model)), resolve_model_source(args.model)
    if args.runtimes_only:
        return merge_runtimes(src, command)
    config = json.loads((hf_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    variants = build_variants(src, hf_dir)
    load_start = os.getloadavg()
    rows = measure(variants, src.parent, head_dim, prompt_len=args.prompt, new=args.new, rounds=args.rounds,
                   windows=args.windows)
    rows = runtime_rows([{"model": args.model, **r} for r in rows], src.parent, bench_prompt(src.parent, args.prompt),
                        args.new, args.rounds)
    notes = {
        "threads": THREADS, "batch": 1, "prompt_tokens": args.prompt, "new_tokens": args.new, "rounds": args.rounds,
        "timing": "medians over round-robin rounds in one process; prefill: the prompt in one call; decode: the "
                  "one-token steps after it, each feeding the cache back",
        "perplexity": f"{args.windows} windows of {PPL_WINDOW} tokens per corpus, the same for every row, fed in "
                      f"one call (perplexity) and {STEP} tokens per call through the KV cache (stepped_perplexity)",
        "evaluation": {corpus: describe_split("evaluation", corpus) for corpus in CORPORA},
        "calibration": "onnxpress variants: --calib sotu",
        "genai_builder": " ".join(GENAI) + f", -p fp32|int4 -e cpu, in {WORK.parent / 'bench-venvs' / 'genai'}",
        "load_average_start_end": [load_start, os.getloadavg()],
        "runtimes": runtimes_note(args.new),
    }
    write_results("decode", rows, command=command, notes=notes, columns=COLUMNS)
    plot(rows, f"{args.model} on {machine()['cpu']}, {THREADS} threads, batch 1", RESULTS / "decode.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
