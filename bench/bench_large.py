"""A decoder over the protobuf limit: a random-weight Llama of 0.74 B parameters (hidden 2048,
12 layers, 32 heads / 8 KV heads, FFN 5632; SmolLM2's tokenizer and vocabulary), built from a
transformers config (no download), exported with ``onnxpress export`` (2.9 GB of float32
weights in external data) and compiled with each of ``--recipes`` (packaged recipes, or ``int4-rtn``: edge-int4's passes
with round-to-nearest int4), each step in a fresh
process whose peak memory (with its children's) is polled with psutil (``common.run_polled``: RSS,
and anonymous memory). Each compiled model must load in ONNX Runtime and generate greedily
through its KV cache.

    OPENBLAS_NUM_THREADS=1 nice python bench/bench_large.py [--recipes lossless edge-int4 balanced]

Writes ``bench/results/large.json`` (rows of steps not run this time kept when they ran on this machine): per step wall time, peak RSS and anonymous memory and their ratios to the fp32 model size,
output size, and the generated tokens' count.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import rows_kept_from_earlier, run_polled, write_results  # noqa: E402

from onnxpress.export import CACHE_ROOT  # noqa: E402

WORK = CACHE_ROOT / "bench-large"
# compiles besides the packaged recipes: edge-int4's passes with round-to-nearest int4 (no calibration, no GPTQ)
PASS_LISTS = {"int4-rtn": ["cleanup", "attention:target=onnxruntime,optional=true",
                           "quantize:mode=weight_only,bits=4,block_size=32,gptq=false"]}
CONFIG = dict(hidden_size=2048, num_hidden_layers=12, num_attention_heads=32, num_key_value_heads=8,
              intermediate_size=5632, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=False)

BUILD_HF = """
import sys, torch, transformers
from onnxpress.export import smollm2_hf_dir
torch.manual_seed(0)
config = transformers.LlamaConfig(**{config})
model = transformers.LlamaForCausalLM(config)
model.save_pretrained(sys.argv[1])
transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir()).save_pretrained(sys.argv[1])
"""
GENERATE = """
import sys
from onnxpress.evaluation import generate_greedy
print(len(generate_greedy(sys.argv[1], sys.argv[2], "The state of the union is", max_new_tokens=8)))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["lossless", "edge-int4", "balanced"])
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    hf, onnx_dir = WORK / "hf", WORK / "onnx"
    rows = []
    if not (hf / "config.json").exists():
        rows.append(run_polled("build HF model", [sys.executable, "-c", BUILD_HF.format(config=CONFIG), str(hf)])[0])
    if not (onnx_dir / "model.onnx").exists():
        rows.append(run_polled("onnxpress export", ["onnxpress", "export", str(hf), "-o", str(onnx_dir)])[0])
    fp32 = sum(f.stat().st_size for f in onnx_dir.iterdir() if f.name.startswith("model.onnx"))
    for recipe in args.recipes:
        out = WORK / f"{recipe}.onnx"
        if recipe in PASS_LISTS:
            how = ["--passes", *PASS_LISTS[recipe]]
        else:
            how = ["--recipe", recipe] + ([] if recipe == "lossless" else ["--calib", "sotu"])
        row, _ = run_polled(f"compile {recipe}", ["onnxpress", "compile", str(onnx_dir / "model.onnx"), "-o", str(out),
                                           *how, "--quiet"])
        if row["ok"]:
            row["output_gb"] = round(sum(f.stat().st_size for f in WORK.glob(f"{recipe}.onnx*")) / 1e9, 2)
            gen, text = run_polled(f"generate {recipe}", [sys.executable, "-c", GENERATE, str(out), str(onnx_dir)])
            row["generated_tokens"] = int(text.strip().splitlines()[-1]) if gen["ok"] else gen.get("error")
            row["generate_peak_rss_gb"] = gen["peak_rss_gb"]
        row["rss_over_fp32"] = round(row["peak_rss_gb"] * 1e9 / fp32, 2)
        row["anon_over_fp32"] = round(row["peak_anon_gb"] * 1e9 / fp32, 2)
        rows.append(row)
    write_results("large", rows_kept_from_earlier("large", rows) + rows, command="python bench/bench_large.py " + " ".join(sys.argv[1:]),
                  notes={"model": {"parameters": "0.74 B", **CONFIG}, "fp32_bytes": fp32})


if __name__ == "__main__":
    main()
