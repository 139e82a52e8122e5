"""Shared benchmark plumbing: alternating timing, machine header, table + JSON output.

Speed is only ever reported as ratios between variants measured in the same run:
variants are timed round-robin (one run of each in turn, repeated), so drift in the
machine's load hits all of them alike; we report medians.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnxpress.cpu

RESULTS = Path(__file__).parent / "results"


def peer_python(name: str, requirements: Sequence[str]) -> Path:
    """The interpreter of a throwaway virtual environment for a peer tool whose dependencies
    stay out of the project's: made on first use under the cache (inheriting this
    environment's packages, so the peer runs on the same onnx and ONNX Runtime) and refilled
    when ``requirements`` change."""
    from onnxpress.export import CACHE_ROOT

    env = CACHE_ROOT / "bench-venvs" / name
    python, marker = env / "bin" / "python", env / ".requirements"
    if marker.exists() and marker.read_text() == " ".join(requirements):
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", "--system-site-packages", str(env)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *requirements],
                   check=True)
    marker.write_text(" ".join(requirements))
    return python


def cpu_flags() -> list[str]:
    """The ISA flags that decide int8 and bfloat16 speed (AVX-512, VNNI, AMX, ...)."""
    return sorted(f for f in onnxpress.cpu.cpu_flags() if f.startswith(("avx", "fma", "sse4", "amx")) or "vnni" in f)


def machine() -> dict[str, Any]:
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "flags": cpu_flags(), "onnxruntime": onnxruntime.__version__}


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    table = [columns] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_results(name: str, rows: Sequence[Mapping[str, Any]], *, command: str, notes: Mapping[str, Any] | None = None,
                  columns: Sequence[str] | None = None) -> Path:
    """Print the machine header and the table; write bench/results/<name>.json."""
    header = machine()
    print(f"# {name}: {header['cpu']}, {header['cores']} cores, flags {' '.join(header['flags'])}, "
          f"onnxruntime {header['onnxruntime']}")
    print(f"# command: {command}")
    print(format_table(rows, columns))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": header, "command": command, "notes": dict(notes or {}), "rows": list(rows)},
                              indent=2, default=str))
    os.replace(tmp, path)
    return path


def run_polled(label: str, cmd: list[str]) -> tuple[dict, str]:
    """Run ``cmd``: a row with its wall time and the peak memory of its process tree, polled every
    0.2 s, and its output. ``peak_rss_gb`` counts the pages of memory-mapped files in memory (weights
    read from an external data file), which the kernel takes back when memory runs short;
    ``peak_anon_gb`` (RSS less shared pages) is the memory the process cannot give back."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    parent, peak, peak_anon = psutil.Process(proc.pid), 0, 0
    while proc.poll() is None:
        try:
            infos = [p.memory_info() for p in [parent, *parent.children(recursive=True)]]
            peak = max(peak, sum(i.rss for i in infos))
            peak_anon = max(peak_anon, sum(i.rss - i.shared for i in infos))
        except psutil.Error:
            pass
        time.sleep(0.2)
    out = proc.stdout.read()
    row = {"step": label, "seconds": round(time.perf_counter() - start, 1), "peak_rss_gb": round(peak / 1e9, 2),
           "peak_anon_gb": round(peak_anon / 1e9, 2), "ok": proc.returncode == 0}
    if proc.returncode:
        row["error"] = out.strip().splitlines()[-1] if out.strip() else f"exit {proc.returncode}"
    print(label, row, flush=True)
    return row, out


def rows_kept_from_earlier(name: str, rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The rows of ``results/<name>.json`` whose steps this run did not repeat, when that file was
    written on this machine (a bench whose steps are hours apart reruns only some)."""
    path = RESULTS / f"{name}.json"
    earlier = json.loads(path.read_text()) if path.exists() else {}
    ran = {r["step"] for r in rows}
    return [r for r in earlier.get("rows", []) if r["step"] not in ran] if earlier.get("machine") == machine() else []


def model_size_mb(path: Path) -> float:
    """The model file and its external data (``.data`` as onnxpress writes it, ``.onnx.data`` or
    ``.onnx_data`` as the exporters do), MB."""
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 1e6


def record_build(variants: dict[str, dict], label: str, group: str, build) -> None:
    """``variants[label]``: ``build()``'s (path, seconds or None: timed here) as {"path", "group",
    "compile_s"}, or {"group", "error"} with the first line of what it raised: a tool failing on a
    model is a result too."""
    import traceback

    t0 = time.perf_counter()
    try:
        path, seconds = build()
        variants[label] = {"path": path, "group": group,
                           "compile_s": round(seconds if seconds is not None else time.perf_counter() - t0, 1)}
    except Exception as exc:
        variants[label] = {"group": group, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
        traceback.print_exc()
    print(f"  built {label}: {variants[label].get('error', 'ok')}", flush=True)


def _recipe_passes(name: str) -> list:
    """A packaged recipe's passes: what makes two compiles with it the same (not its description)."""
    import yaml

    from onnxpress.recipe import RECIPE_DIR

    return yaml.safe_load((RECIPE_DIR / f"{name}.yaml").read_text())["passes"]


def compile_cached(src: Path, out: Path, kwargs: dict, threads: int = 2) -> tuple[Path, float]:
    """(output, compile seconds) of ``compile_model(src, out, calib=["sotu"], **kwargs)``, or of the
    earlier compile when ``out``'s report shows the same model, passes or recipe (and its passes)
    and sample count (``kwargs`` holds ``recipe``, ``budget`` + ``objective`` or ``passes``, and
    ``max_samples``)."""
    from onnxpress.compile import compile_model, report_path

    report = report_path(out)
    if out.exists() and report.exists():
        old = json.loads(report.read_text())
        if "recipe" in kwargs:
            same = (old["recipe"] == kwargs["recipe"]
                    and old.get("extra", {}).get("bench_recipe_passes") == _recipe_passes(kwargs["recipe"]))
        elif "budget" in kwargs:
            same = old["recipe"].startswith(f"auto (budget {kwargs['budget']:g}, objective {kwargs['objective']}")
        else:
            same = old["recipe"] == "command-line" and old.get("extra", {}).get("bench_passes") == kwargs["passes"]
        if same and old["model"] == str(src) and old.get("extra", {}).get("bench_max_samples", "?") == kwargs["max_samples"]:
            return out, old["seconds"]
    r = compile_model(src, out, calib=["sotu"], threads=threads, progress=False, **kwargs)
    r.extra["bench_max_samples"] = kwargs["max_samples"]  # remember what was asked, for the reuse check above
    if "passes" in kwargs:
        r.extra["bench_passes"] = kwargs["passes"]
    if "recipe" in kwargs:
        r.extra["bench_recipe_passes"] = _recipe_passes(kwargs["recipe"])
    r.write_json(report)
    return out, r.seconds


def run_pass(path: Path, pass_name: str, settings: dict, calib, out: Path, *, threads: int = 2):
    """Run a pass through its public ``run`` (which also verifies it) and save the result."""
    from types import SimpleNamespace

    from onnxpress.fidelity import primary_outputs
    from onnxpress.model_io import load_model, save_model
    from onnxpress.pass_infra import build_pass
    from onnxpress.pipeline import CompileContext

    model = load_model(path)
    ctx = CompileContext(verification=calib.batches[:1], calibration=SimpleNamespace(batches=calib.batches),
                         threads=threads)
    ctx.output_names = primary_outputs(model)
    ctx.reference = ctx.run(model)
    start = time.perf_counter()
    result = build_pass(pass_name, settings).run(model, ctx)
    seconds = time.perf_counter() - start
    save_model(model, out)
    return result, seconds


_PEAK_RSS = """
import sys
import numpy as np
from onnxpress.runtime import make_session, session_feeds
if sys.argv[1] != "-":
    s = make_session(sys.argv[1], threads=int(sys.argv[3]))
    s.run(None, session_feeds(s, dict(np.load(sys.argv[2]))))
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork + exec, so the parent's peak would leak in
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


def peak_rss_mb(path: Path | str, feeds: Mapping[str, Any], threads: int = 2) -> float:
    """Peak RSS (MiB) of a fresh python that loads ``path`` in ORT and runs ``feeds`` once
    (``path`` "-": the same interpreter with onnxpress imported and no model, the baseline)."""
    import subprocess
    import sys
    import tempfile

    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "feeds.npz"
        np.savez(npz, **feeds)
        out = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(path), str(npz), str(threads)],
                             check=True, capture_output=True, text=True)
    return int(out.stdout.split()[-1]) / 1024
