"""End to end: the attention pass on MiniLM and SmolLM2-135M, every target.

For each target the substituted model is checked against the original (every output
element within 1e-4 absolute plus 1e-4 relative, numpy's allclose: SmolLM2's logits
reach 30, where a float32 step is 2e-6 and 30 layers of re-ordered sums add up to about
1e-4) and timed against it in the same process, alternating, with 2 ORT threads:

* MiniLM (all-MiniLM-L6-v2) batch 8 x 128 (two rows right-padded by 32);
* SmolLM2 prefill 1 x 128, and one decode step after a 128-token cache (tokens/s);
* SmolLM2 greedy generation (20 tokens, KV cache) through each substituted model
  must give the original's tokens;
* the sliding-window approximation (onnxpress target) on MiniLM at sequence 512:
  speed vs exact onnxpress attention and vs the original, and its accuracy cost
  (relative L2 and worst row cosine of last_hidden_state).

    nice python bench/bench_attention_e2e.py [--repeats 10] [--skip-onnx]

Writes bench/results/attention_e2e.json. Ratios are original / substituted time (>1 = faster).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from common import write_results  # noqa: E402

from onnxpress.fidelity import compare_outputs  # noqa: E402
from onnxpress.model_io import load_model  # noqa: E402
from onnxpress.passes.attention import substitute_attention  # noqa: E402
from onnxpress.runtime import make_session, time_alternating  # noqa: E402

THREADS = 2
TOL = 1e-4  # absolute and relative
PROMPT = "The capital of France is"


def _substituted(path: Path, target: str, window: int = 0):
    model = load_model(path)
    outcome = substitute_attention(model, target, window=window)
    return model, outcome


def _text_feeds(session, batch: int, seq: int, pad_rows: int = 0, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 20000, size=(batch, seq), dtype=np.int64)
    mask = np.ones_like(ids)
    for r in range(pad_rows):
        mask[batch - 1 - r, seq - 32:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    names = {i.name: i for i in session.get_inputs()}
    if "token_type_ids" in names:
        feeds["token_type_ids"] = np.zeros_like(ids)
    if "position_ids" in names:
        feeds["position_ids"] = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    for name, spec in names.items():
        if name.startswith("past"):
            feeds[name] = np.zeros((batch, spec.shape[1], 0, spec.shape[3]), np.float32)
    return feeds


def _max_diff(a_sess, b_sess, feeds) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / (1 + |a|)) over every output: the second <= TOL is allclose."""
    names = [o.name for o in a_sess.get_outputs()]
    a, b = a_sess.run(names, feeds), b_sess.run(names, feeds)
    return (max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True)),
            max(float((np.abs(x - y) / (1 + np.abs(x))).max()) for x, y in zip(a, b, strict=True)))


def bench_minilm(path: Path, targets: list[str], repeats: int) -> list[dict]:
    base = make_session(path, threads=THREADS)
    feeds = _text_feeds(base, 8, 128, pad_rows=2)
    rows, runs = [], {"original": lambda: base.run(None, feeds)}
    for target in targets:
        model, outcome = _substituted(path, target)
        sess = make_session(model, threads=THREADS)
        diff, scaled = _max_diff(base, sess, feeds)
        runs[target] = lambda s=sess: s.run(None, feeds)
        rows.append({"model": "MiniLM", "case": "batch 8 x 128", "target": target,
                     "fused": outcome.changes["attention_fused"], "max_abs_diff": diff,
                     "max_diff_over_1_plus_abs": scaled, "match": scaled <= TOL})
    times = time_alternating(runs, repeats=repeats)
    for row in rows:
        row["ms"] = times[row["target"]] * 1e3
        row["ms_original"] = times["original"] * 1e3
        row["speedup"] = times["original"] / times[row["target"]]
    return rows


def bench_smollm2(path: Path, tok_dir: Path, targets: list[str], repeats: int) -> list[dict]:
    from onnxpress.evaluation import generate_greedy

    base = make_session(path, threads=THREADS)
    prefill = _text_feeds(base, 1, 128)
    names = [o.name for o in base.get_outputs()]
    out = dict(zip(names, base.run(names, prefill), strict=True))
    decode = {"input_ids": np.array([[4321]], np.int64), "attention_mask": np.ones((1, 129), np.int64),
              "position_ids": np.array([[128]], np.int64)}
    for name in names:
        if name.startswith("present"):
            decode[name.replace("present", "past_key_values", 1)] = out[name]
    ref_tokens = generate_greedy(base, tok_dir, PROMPT, max_new_tokens=20)
    sessions, rows = {}, []
    for target in targets:
        model, outcome = _substituted(path, target)
        sess = make_session(model, threads=THREADS)
        del model
        gc.collect()
        (diff, scaled), (diff_d, scaled_d) = _max_diff(base, sess, prefill), _max_diff(base, sess, decode)
        diff, scaled = max(diff, diff_d), max(scaled, scaled_d)
        tokens = generate_greedy(sess, tok_dir, PROMPT, max_new_tokens=20)
        sessions[target] = sess
        rows.append({"model": "SmolLM2-135M", "target": target, "fused": outcome.changes["attention_fused"],
                     "max_abs_diff": diff, "max_diff_over_1_plus_abs": scaled, "match": scaled <= TOL,
                     "greedy_20_same": tokens == ref_tokens,
                     "ops": ",".join(outcome.details["ops"])})
    all_sessions = {"original": base, **sessions}
    t_pre = time_alternating({k: (lambda s=s: s.run(None, prefill)) for k, s in all_sessions.items()},
                             repeats=repeats)
    t_dec = time_alternating({k: (lambda s=s: s.run(None, decode)) for k, s in all_sessions.items()},
                             repeats=repeats * 3)
    for row in rows:
        t = row["target"]
        row.update({"prefill_ms": t_pre[t] * 1e3, "prefill_speedup": t_pre["original"] / t_pre[t],
                    "decode_tok_s": 1.0 / t_dec[t], "decode_tok_s_original": 1.0 / t_dec["original"],
                    "decode_speedup": t_dec["original"] / t_dec[t]})
    return rows


def bench_window(path: Path, windows: list[int], repeats: int) -> list[dict]:
    """MiniLM (12 heads x 32) at sequence 512: exact onnxpress vs sliding windows."""
    base = make_session(path, threads=THREADS)
    feeds = _text_feeds(base, 2, 512)
    ref = base.run(["last_hidden_state"], feeds)[0]
    runs = {"original": lambda: base.run(None, feeds)}
    rows = []
    for window in [0, *windows]:
        model, outcome = _substituted(path, "onnxpress", window=window)
        sess = make_session(model, threads=THREADS)
        out = sess.run(["last_hidden_state"], feeds)[0]
        fid = compare_outputs([{"h": ref}], [{"h": out}])
        key = f"window {window}" if window else "exact"
        runs[key] = lambda s=sess: s.run(None, feeds)
        rows.append({"model": "MiniLM", "case": "batch 2 x 512", "target": "onnxpress", "window": window,
                     "fused": outcome.changes["attention_fused"], "rel_l2": fid.rel_l2,
                     "cosine_min": fid.cosine_min, "key": key})
    times = time_alternating(runs, repeats=repeats)
    for row in rows:
        key = row.pop("key")
        row.update({"ms": times[key] * 1e3, "speedup_vs_original": times["original"] / times[key],
                    "speedup_vs_exact": times["exact"] / times[key]})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-onnx", action="store_true", help="leave out the ONNX Attention (opset 23) target")
    parser.add_argument("--windows", default="128,64")
    args = parser.parse_args(argv)
    from conftest import export_minilm, export_smollm2

    targets = ["onnxruntime", "onnxpress"] + ([] if args.skip_onnx else ["onnx"])
    minilm, smollm2 = export_minilm(), export_smollm2()
    load_start = os.getloadavg()
    rows = bench_minilm(minilm, targets, args.repeats)
    rows += bench_smollm2(smollm2, smollm2.parent, targets, args.repeats)
    rows += bench_window(minilm, [int(w) for w in args.windows.split(",")], max(3, args.repeats // 2))
    command = "nice python bench/bench_attention_e2e.py " + " ".join(argv if argv is not None else sys.argv[1:])
    columns = ["model", "case", "target", "window", "fused", "max_abs_diff", "max_diff_over_1_plus_abs", "match",
               "greedy_20_same", "ms",
               "speedup", "prefill_ms", "prefill_speedup", "decode_tok_s", "decode_tok_s_original",
               "decode_speedup", "rel_l2", "cosine_min", "speedup_vs_original", "speedup_vs_exact"]
    write_results("attention_e2e", rows, command=command.strip(), columns=columns,
                  notes={"threads": THREADS, "tolerance": TOL, "speedup": "original time / substituted time",
                         "prompt": PROMPT, "load_average_start": load_start, "load_average_end": os.getloadavg(),
                         "reading": "compare the ratios (same run, alternating); absolute ms depend on the load"})
    return 0 if all(r.get("match", True) and r.get("greedy_20_same", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
