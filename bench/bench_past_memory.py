"""A decoder bigger than this machine's memory, compiled int4 weight-only.

A random-weight Llama of 7.4 B parameters (hidden 4096, 32 layers, 32 heads / 8 KV heads, FFN
14336, SmolLM2's vocabulary of 49152, untied head): 29.5 GB of float32 weights in external data.
No machine that cannot hold it can build it with transformers and export it, so it is built
from a two-layer model of the same widths (transformers config, ``onnxpress export``): the
exported graph's last layer is copied 30 times, each copy with fresh random weights
(normal, std 0.02, as transformers initialises them) appended to the data file. The graph is the
exporter's, layer for layer.

It is then compiled with edge-int4's passes and round-to-nearest int4 (``bench_large.py``'s
``int4-rtn``: no calibration data, verification on synthetic tokens) and must generate greedily
through its KV cache. Each step runs in a fresh process; ``run_polled`` records its peak RSS
(which counts the mapped weights' pages in memory) and its peak anonymous memory (what the
kernel cannot take back by dropping those pages).

    OPENBLAS_NUM_THREADS=1 python bench/bench_past_memory.py [--layers 32] [--memory-limit-gb 10]

``--memory-limit-gb`` runs the compile in a memory cgroup (v1, as root) with that limit, mapped
file pages included: a machine with that much memory, and a run that other work on the same
machine neither crowds out nor is crowded out by.

Writes ``bench/results/past_memory.json`` with the machine's total and available memory (rows of
steps not run this time, such as building the model, kept when they ran on this machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_large import BUILD_HF, GENERATE, PASS_LISTS  # noqa: E402
from common import rows_kept_from_earlier, run_polled, write_results  # noqa: E402

from onnxpress.export import CACHE_ROOT  # noqa: E402

WORK = CACHE_ROOT / "bench-past-memory"
CONFIG = dict(hidden_size=4096, num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8,
              intermediate_size=14336, vocab_size=49152, max_position_embeddings=4096, tie_word_embeddings=False)
DATA = "model.onnx_data"  # the exporter's external data file name
ALIGN = 4096  # appended tensors start on a page, so ONNX Runtime can map them


def deepen(src: Path, dst: Path, layers: int, seed: int = 0) -> int:
    """Copy ``src``'s exported decoder to ``dst`` with ``layers`` layers: its last layer's nodes
    repeated under the next layer numbers, reading the previous copy's hidden state and their own
    KV cache inputs, with new random weights for each. Returns the data file's size in bytes."""
    import numpy as np
    import onnx

    model = onnx.load(str(src / "model.onnx"), load_external_data=False)
    graph = model.graph
    base = 1 + max(int(n.name.split("/")[2].split(".")[1]) for n in graph.node if n.name.startswith("/model/layers."))
    last = f"layers.{base - 1}"
    template = [n for n in graph.node if n.name.startswith(f"/model/{last}/")]
    made = {o for n in template for o in n.output}
    hidden_out = f"/model/{last}/Add_1_output_0"  # the layer's residual stream out, as the exporter names it
    assert hidden_out in made, f"no {hidden_out}: not an optimum Llama export"
    hidden_in = hidden_out.replace(last, f"layers.{base - 2}")
    weights = {i.name: i for i in graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL}
    read = {i for n in template for i in n.input}
    layer_weights = [weights[name] for name in sorted(read & weights.keys())]
    inputs = {i.name: i for i in graph.input}
    outputs = {o.name: o for o in graph.output}

    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / DATA, dst / DATA)
    new_nodes, rng = [], np.random.default_rng(seed)
    with open(dst / DATA, "ab") as data:
        for layer in range(base, layers):
            def rename(name: str, layer: int = layer) -> str:
                for old, new in ((f"{last}/", f"layers.{layer}/"), (f"present.{base - 1}.", f"present.{layer}.")):
                    if old in name:
                        return name.replace(old, new)
                return f"{name}_l{layer}"

            names = {hidden_in: f"/model/layers.{layer - 1}/Add_1_output_0" if layer > base else hidden_out}
            names |= {o: rename(o) for o in made}
            for kind in ("key", "value"):
                past = inputs[f"past_key_values.{base - 1}.{kind}"]
                names[past.name] = f"past_key_values.{layer}.{kind}"
                graph.input.append(onnx.ValueInfoProto(name=names[past.name], type=past.type))
                present = outputs[f"present.{base - 1}.{kind}"]
                graph.output.append(onnx.ValueInfoProto(name=rename(present.name), type=present.type))
            for tensor in layer_weights:
                data.seek(0, os.SEEK_END)
                data.write(b"\0" * (-data.tell() % ALIGN))
                offset = data.tell()
                array = rng.standard_normal(tuple(tensor.dims), dtype=np.float32)
                array *= 0.02
                array.tofile(data)
                names[tensor.name] = f"{tensor.name}_l{layer}"
                copy = onnx.TensorProto(name=names[tensor.name], dims=tensor.dims, data_type=tensor.data_type,
                                        data_location=onnx.TensorProto.EXTERNAL)
                for key, value in (("location", DATA), ("offset", str(offset)), ("length", str(array.nbytes))):
                    copy.external_data.add(key=key, value=value)
                graph.initializer.append(copy)
            for node in template:
                copy = onnx.NodeProto()
                copy.CopyFrom(node)
                copy.name = node.name.replace(f"{last}/", f"layers.{layer}/")
                copy.input[:] = [names.get(i, i) for i in node.input]
                copy.output[:] = [names[o] for o in node.output]
                new_nodes.append(copy)
        size = data.tell()
    # the new layers go after the template's last node; what read its hidden state reads the last copy's
    end = max(i for i, n in enumerate(graph.node) if n.name.startswith(f"/model/{last}/")) + 1
    rest = list(graph.node[end:])
    for node in rest:
        node.input[:] = [f"/model/layers.{layers - 1}/Add_1_output_0" if i == hidden_out else i for i in node.input]
    del graph.node[end:]
    graph.node.extend(new_nodes + rest)
    onnx.save(model, str(dst / "model.onnx"))
    for extra in src.iterdir():
        if not extra.name.startswith("model.onnx"):
            shutil.copy(extra, dst / extra.name)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}, indent=2))
    return size


CGROUP = Path("/sys/fs/cgroup/memory/onnxpress-bench")


def within_memory(cmd: list[str], gb: float | None) -> list[str]:
    """``cmd``, run in a memory cgroup limited to ``gb`` (when given)."""
    if gb is None:
        return cmd
    CGROUP.mkdir(exist_ok=True)
    (CGROUP / "memory.limit_in_bytes").write_text(str(int(gb * 2**30)))
    return ["sh", "-c", f'echo $$ > {CGROUP}/cgroup.procs && exec "$@"', "sh", *cmd]


def memory_gb() -> dict:
    import psutil

    vm = psutil.virtual_memory()
    return {"total_gb": round(vm.total / 1e9, 2), "available_gb": round(vm.available / 1e9, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--memory-limit-gb", type=float, help="compile in a memory cgroup with this limit (GiB)")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    hf, base, deep = WORK / "hf-2-layers", WORK / "onnx-2-layers", WORK / f"onnx-{args.layers}-layers"
    rows = []
    if not (deep / "model.onnx").exists():
        if not (base / "model.onnx").exists():
            if not (hf / "config.json").exists():
                rows.append(run_polled("build HF model (2 layers)",
                                       [sys.executable, "-c", BUILD_HF.format(config=CONFIG), str(hf)])[0])
            rows.append(run_polled("onnxpress export (2 layers)", ["onnxpress", "export", str(hf), "-o", str(base)])[0])
        start = time.perf_counter()
        deepen(base, deep, args.layers)
        rows.append({"step": f"copy the last layer up to {args.layers} layers",
                     "seconds": round(time.perf_counter() - start, 1), "ok": True})
        shutil.rmtree(hf, ignore_errors=True)  # disk: the deep model holds everything they did
        shutil.rmtree(base, ignore_errors=True)
    fp32 = sum(f.stat().st_size for f in deep.iterdir() if f.name.startswith("model.onnx"))
    memory = memory_gb()
    print(f"model {fp32 / 1e9:.2f} GB; machine memory {memory}", flush=True)
    out = WORK / "int4-rtn.onnx"
    compile_cmd = ["onnxpress", "compile", str(deep / "model.onnx"), "-o", str(out), "--passes", *PASS_LISTS["int4-rtn"]]
    label = "compile int4-rtn" + (f" within {args.memory_limit_gb:g} GiB" if args.memory_limit_gb else "")
    row, text = run_polled(label, within_memory(compile_cmd, args.memory_limit_gb))
    row["memory_limit_gb"] = args.memory_limit_gb
    if row["ok"]:
        row["output_gb"] = round(sum(f.stat().st_size for f in WORK.glob("int4-rtn.onnx*")) / 1e9, 2)
        report = json.loads(out.with_suffix(".report.json").read_text()) if out.with_suffix(".report.json").exists() else {}
        row["passes"] = [{k: p.get(k) for k in ("name", "changes", "seconds", "peak_rss_mb", "error", "measured_error")} for p in report.get("passes", [])]
        gen, gen_text = run_polled("generate int4-rtn", [sys.executable, "-c", GENERATE, str(out), str(deep)])
        gen["generated_tokens"] = int(gen_text.strip().splitlines()[-1]) if gen["ok"] else None
        rows += [row, gen]
    else:
        print(text[-3000:])
        rows.append(row)
    for r in rows:
        if "peak_rss_gb" in r:
            r["rss_over_fp32"] = round(r["peak_rss_gb"] * 1e9 / fp32, 2)
            r["anon_over_fp32"] = round(r["peak_anon_gb"] * 1e9 / fp32, 2)
    write_results("past_memory", rows_kept_from_earlier("past_memory", rows) + rows, command="python bench/bench_past_memory.py " + " ".join(sys.argv[1:]),
                  notes={"model": {"parameters_b": round(fp32 / 4e9, 2), **CONFIG, "num_hidden_layers": args.layers},
                         "fp32_bytes": fp32, "memory_at_start": memory},
                  columns=["step", "memory_limit_gb", "seconds", "peak_rss_gb", "peak_anon_gb", "rss_over_fp32", "anon_over_fp32",
                           "output_gb", "generated_tokens", "ok"])


if __name__ == "__main__":
    main()
