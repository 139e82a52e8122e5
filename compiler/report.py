"""The compile report: one row per pass, as JSON and as a readable table.

The table speaks the model's terms: each stage's fidelity against the input model
(embedding cosine for encoders, perplexity change for decoders). The raw relative L2
error between stages, which verification uses, stays in the JSON.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from onnxpress.pass_infra import PassReport


@dataclass
class CompileReport:
    """What ``compile`` did: one ``PassReport`` row per pass, sizes, and the end-to-end
    fidelity of the output against the input model (``fidelity``: the last row's ``vs_input``)."""

    model: str
    output: str
    recipe: str
    calibration: str
    passes: list[PassReport] = field(default_factory=list)
    size_before: int = 0
    size_after: int = 0
    seconds: float = 0.0
    peak_rss_mb: float | None = None  # the compile's peak memory (``memory.process_peak_mb``)
    verified_on: str = ""  # the samples every stage was verified and measured on
    unseen_on: str = ""  # held-out samples of a domain the calibration never saw (named data only)
    # the input's compute precision and the rounding its checks allowed (``onnxpress.precision``)
    precision: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def params_before(self) -> int:
        return self.passes[0].params_before if self.passes else 0

    @property
    def params_after(self) -> int:
        return self.passes[-1].params_after if self.passes else 0

    @property
    def fidelity(self) -> dict[str, Any]:
        """The output model against the input model (``TaskFidelity.to_dict``), or {} when not measured."""
        return self.passes[-1].vs_input if self.passes else {}

    @property
    def fidelity_unseen(self) -> dict[str, Any]:
        """The same on the unseen domain's samples ({} without them)."""
        return self.passes[-1].vs_unseen if self.passes else {}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["passes"] = [p.to_dict() for p in self.passes]
        data["params_before"], data["params_after"] = self.params_before, self.params_after
        data["fidelity"], data["fidelity_unseen"] = self.fidelity, self.fidelity_unseen
        return data

    def write_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        tmp = path.with_name(f".onnxpress-{uuid.uuid4().hex}.json")
        # os.open with 0o666 applies the umask, as for the model file (mkstemp would make it private)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=2, default=str)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def format_table(self) -> str:
        unseen = bool(self.fidelity_unseen)
        header = ["pass", "weights", "params", "MACs/token", "vs input", *(["unseen domain"] if unseen else []),
                  "verified", "time", "changed"]
        rows = [header]
        for p in self.passes:
            changes = ", ".join(f"{k} {v}" for k, v in p.changes.items() if v) or "nothing"
            verified = "yes" if p.measured_error is not None else "no" if p.modified else "-"
            rows.append([
                p.name,
                f"{_si(p.weight_bytes_before, 'B')} -> {_si(p.weight_bytes_after, 'B')}",
                f"{_si(p.params_before)} -> {_si(p.params_after)}",
                f"{_si(p.macs_before)} -> {_si(p.macs_after)}",
                describe_fidelity(p.vs_input),
                *([describe_fidelity(p.vs_unseen)] if unseen else []),
                verified,
                f"{p.seconds:.1f}s",
                changes,
            ])
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        summary = (
            f"{self.model} -> {self.output} (recipe {self.recipe}; calibration: {self.calibration})\n"
            f"file size {_si(self.size_before, 'B')} -> {_si(self.size_after, 'B')}, "
            f"parameters {_si(self.params_before)} -> {_si(self.params_after)}, {self.seconds:.1f}s"
            f"{f', peak memory {self.peak_rss_mb / 1024:.2f} GiB' if self.peak_rss_mb else ''}\n"
            f"{self._format_fidelity()}"
        )
        notes = "".join(f"\nnote: {n}" for n in [*self._precision_notes(), *self.extra.get("notes", [])])
        files = self.extra.get("runtime_files")
        written = f"\nruntime files written beside the model: {', '.join(files)}" if files else ""
        return summary + "\n" + "\n".join(lines) + notes + written + self._format_search()

    def _precision_notes(self) -> list[str]:
        if not self.precision or self.precision.get("name") == "float32":
            return []
        p = self.precision
        return [f"a {p['name']} model: lossless passes are verified to {p['lossless_tolerance']:g} relative L2, "
                f"the others to their reported error + {p['rounding_slack']:g} ({p['name']} rounding)"]

    def _format_fidelity(self) -> str:
        """The whole compile's fidelity lines, e.g. 'fidelity vs input on ...: embedding cosine 0.9958 mean / ...',
        and the same on the unseen domain when it was measured."""
        fid = self.fidelity
        if not fid:
            return "fidelity vs input: not measured"
        where = f" on {self.verified_on}" if self.verified_on else f" on {fid['samples']} samples"
        line = f"fidelity vs input{where}: {_fidelity_value(fid)}"
        if self.fidelity_unseen:
            line += (f"\nfidelity vs input on {self.unseen_on} (a domain the calibration never saw): "
                     f"{_fidelity_value(self.fidelity_unseen)}")
        return line

    def _format_search(self) -> str:
        """The automatic search's trace: one line per measured candidate."""
        found = self.extra.get("search")
        if not found:
            return ""
        lines = [
            f"\nsearch (budget {found['budget']:g}, objective {found['objective']}; loss = {found['loss']}), "
            f"{found['seconds']:.0f}s:"
        ]
        for c in found["trace"]:
            mark = "*" if c["label"] == found["chosen"] else " "
            lines.append(
                f" {mark} {c['label']}: loss {c['loss']:.4g} (bound {c['loss_bound']:.4g})"
                f"{'' if c['fits'] else ' (over budget)'}, "
                f"{c['latency_ms']:.3g} ms, {_si(c['size_bytes'], 'B')}, {c['seconds']:.0f}s"
            )
        lines += [f"   note: {n}" for n in found.get("notes", [])]
        return "\n".join(lines)


def _fidelity_value(fid: dict[str, Any]) -> str:
    if "perplexity_change" in fid:
        return (f"perplexity {_percent(fid['perplexity_change'])} "
                f"({fid['perplexity_reference']:.4g} -> {fid['perplexity']:.4g})")
    return f"{fid['metric']} {fid['cosine_mean']:.4f} mean / {fid['cosine_min']:.4f} min"


def describe_fidelity(fid: dict[str, Any]) -> str:
    """A ``TaskFidelity`` dict in a few words: 'cosine 0.9958 mean / 0.9912 min' or 'perplexity +2.05%'."""
    if not fid:
        return "-"
    if "perplexity_change" in fid:
        return f"perplexity {_percent(fid['perplexity_change'])}"
    return f"cosine {fid['cosine_mean']:.4f} mean / {fid['cosine_min']:.4f} min"


def _percent(change: float) -> str:
    return f"{round(100 * change, 2) + 0.0:+.2f}%"  # + 0.0: no "-0.00%"


def _si(n: float, unit: str = "") -> str:
    for prefix in ("", "k", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.3g}{prefix}{unit}" if prefix or unit else f"{n:.0f}"
        n /= 1000
    return f"{n:.3g}T{unit}"
