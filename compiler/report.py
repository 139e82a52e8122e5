"""The compile report: one row per pass, as JSON and as a readable table."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from onnxpress.pass_infra import PassReport


@dataclass
class CompileReport:
    model: str
    output: str
    recipe: str
    calibration: str
    passes: list[PassReport] = field(default_factory=list)
    size_before: int = 0
    size_after: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def params_before(self) -> int:
        return self.passes[0].params_before if self.passes else 0

    @property
    def params_after(self) -> int:
        return self.passes[-1].params_after if self.passes else 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["passes"] = [p.to_dict() for p in self.passes]
        data["params_before"], data["params_after"] = self.params_before, self.params_after
        return data

    def write_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=".onnxpress-", suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_dict(), f, indent=2, default=str)
        os.replace(tmp, path)
        return path

    def format_table(self) -> str:
        header = ["pass", "changed", "params", "MACs/token", "error (rel L2)", "checked", "time"]
        rows = [header]
        for p in self.passes:
            changes = ", ".join(f"{k} {v}" for k, v in p.changes.items() if v) or "nothing"
            rows.append([
                p.name,
                changes,
                f"{_si(p.params_before)} -> {_si(p.params_after)}",
                f"{_si(p.macs_before)} -> {_si(p.macs_after)}",
                f"{p.error:.2e}",
                "-" if p.measured_error is None else f"{p.measured_error:.2e}",
                f"{p.seconds:.1f}s",
            ])
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        summary = (
            f"{self.model} -> {self.output} (recipe {self.recipe}; calibration: {self.calibration})\n"
            f"file size {_si(self.size_before, 'B')} -> {_si(self.size_after, 'B')}, "
            f"parameters {_si(self.params_before)} -> {_si(self.params_after)}, {self.seconds:.1f}s"
        )
        notes = "".join(f"\nnote: {n}" for n in self.extra.get("notes", []))
        return summary + "\n" + "\n".join(lines) + notes + self._format_search()

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


def _si(n: float, unit: str = "") -> str:
    for prefix in ("", "k", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.3g}{prefix}{unit}" if prefix or unit else f"{n:.0f}"
        n /= 1000
    return f"{n:.3g}T{unit}"
