"""Half-precision inputs: every packaged recipe compiled from the float32 export and from its
float16 conversion (``onnxpress export --dtype fp16``), both measured against the float32
export on the evaluation splits of both corpora (SOTU, the calibration's domain, and BBC
News, a domain it never saw), so the float16 compile's cost reads beside the float32 one's.

    OPENBLAS_NUM_THREADS=1 nice python bench/bench_precision.py --models minilm smollm2 [--recipes ...]
        [--distill-steps N]   # distillation by steps, not wall time: the two precisions train alike

Columns: file size; encoders, mean / min sentence-embedding cosine vs the float32 export;
decoders, perplexity change vs it; ``d_*``: the float16 row minus the float32 row of the same
recipe. Compiles keep their outputs under the cache (``--reuse`` re-measures them). Writes
``bench/results/precision.json`` (rows of other models and recipes kept). Nothing is timed: speed is ``bench_compare.py``'s.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402

from onnxpress.compile import compile_model  # noqa: E402
from onnxpress.evaluation import evaluate  # noqa: E402
from onnxpress.export import CACHE_ROOT, cached_export, export_model  # noqa: E402
from onnxpress.fidelity import model_kind  # noqa: E402
from onnxpress.model_io import load_model  # noqa: E402
from onnxpress.recipe import RECIPE_DIR  # noqa: E402

WORK = CACHE_ROOT / "bench-precision"
RECIPES = ("lossless", "balanced", "small", "edge-int4")
CORPORA = {"sotu": "", "bbc": "bbc_"}


def exports(name: str) -> dict[str, Path]:
    """{"fp32": the cached export, "fp16": its float16 export (made once under the cache)}."""
    fp16 = CACHE_ROOT / "onnx" / f"{name}-fp16"
    if not (fp16 / "model.onnx").exists():
        export_model(name, fp16, dtype="fp16")
    return {"fp32": cached_export(name), "fp16": fp16 / "model.onnx"}


@functools.cache
def _perplexities(model: Path, tokenizer_dir: Path) -> dict:
    result = evaluate(model, tokenizer_dir=tokenizer_dir, threads=2)
    return {corpus: result[f"{prefix}perplexity"] for corpus, prefix in CORPORA.items()}


def fidelity(model: Path, reference: Path, kind: str) -> dict:
    """Against the float32 export: cosine (encoders) or perplexity change (decoders), per corpus."""
    row = {}
    if kind == "decoder":  # perplexity needs no reference run: the reference's is measured once
        ppl, ref = _perplexities(model, reference.parent), _perplexities(reference, reference.parent)
        return {f"{corpus}_ppl_change": ppl[corpus] / ref[corpus] - 1 for corpus in CORPORA}
    result = evaluate(model, reference, tokenizer_dir=reference.parent, threads=2)
    for corpus, prefix in CORPORA.items():
        row[f"{corpus}_cos_mean"] = result[f"{prefix}embedding_cosine_mean"]
        row[f"{corpus}_cos_min"] = result[f"{prefix}embedding_cosine_min"]
    return row


def recipe_source(recipe: str, distill_steps: int | None) -> tuple[str, str | Path]:
    """(row label, what ``compile_model`` takes): the packaged recipe, or with ``distill_steps`` a
    copy whose ``distill`` runs exactly that many steps (no wall-time limit), so that both
    precisions train alike however loaded the machine is."""
    data = yaml.safe_load((RECIPE_DIR / f"{recipe}.yaml").read_text())
    distills = [e for e in data["passes"] if isinstance(e, dict) and "distill" in e]
    if not distill_steps or not distills:
        return recipe, recipe
    for entry in distills:
        entry["distill"] = {**(entry["distill"] or {}), "steps": distill_steps, "max_minutes": 600}
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"{recipe}-distill-{distill_steps}.yaml"
    path.write_text(yaml.safe_dump(data))
    return f"{recipe} (distill {distill_steps} steps)", path


def measure(name: str, recipes, reuse: bool, distill_steps: int | None = None) -> list[dict]:
    sources = exports(name)
    reference = sources["fp32"]
    kind = model_kind(load_model(reference))
    work = WORK / name
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for dtype, src in sources.items():
        rows.append({"model": name, "recipe": "(export)", "dtype": dtype,
                     "MB": round(src.stat().st_size / 1e6, 1), **fidelity(src, reference, kind)})
    for recipe in recipes:
        label, source = recipe_source(recipe, distill_steps)
        for dtype, src in sources.items():
            out = work / f"{label.replace(' ', '_')}.{dtype}.onnx"
            row = {"model": name, "recipe": label, "dtype": dtype}
            if not (reuse and out.exists()):
                start = time.perf_counter()
                compile_model(src, out, recipe=source, calib=None if recipe == "lossless" else ["sotu"],
                              tokenizer_dir=reference.parent, threads=2, progress=False)
                row["compile_s"] = round(time.perf_counter() - start, 1)
            report = json.loads(out.with_suffix(".report.json").read_text())
            row.setdefault("compile_s", round(report["seconds"], 1))  # reused: the compile's own time
            row["MB"] = round(report["size_after"] / 1e6, 1)
            row.update(fidelity(out, reference, kind))
            row["precision_note"] = report.get("precision", {}).get("name")
            rows.append(row)
    by_key = {(r["recipe"], r["dtype"]): r for r in rows}
    for r in rows:
        if r["dtype"] == "fp16":
            base = by_key[(r["recipe"], "fp32")]
            for key in [k for k in r if k.startswith(("sotu_", "bbc_")) and k.endswith(("mean", "change"))]:
                r[f"d_{key}"] = r[key] - base[key]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--reuse", action="store_true", help="re-measure compiles an earlier run kept")
    parser.add_argument("--distill-steps", type=int, metavar="N",
                        help="recipes with distillation: exactly N steps (no time limit), the same for both precisions")
    args = parser.parse_args()
    path = RESULTS / "precision.json"
    labels = [recipe_source(r, args.distill_steps)[0] for r in args.recipes]
    done = {(m, r) for m in args.models for r in ("(export)", *labels)}
    kept = [r for r in json.loads(path.read_text())["rows"] if (r["model"], r["recipe"]) not in done] \
        if path.exists() else []
    command = "OPENBLAS_NUM_THREADS=1 nice python bench/bench_precision.py " + " ".join(sys.argv[1:])
    # rows of other models and recipes are kept, each with the command that measured it
    rows = kept + [{**row, "command": command} for name in args.models
                   for row in measure(name, args.recipes, args.reuse, args.distill_steps)]
    write_results("precision", rows, command=command,
                  notes={"reference": "every row against the float32 export; d_*: float16 row minus float32 row"})


if __name__ == "__main__":
    main()
