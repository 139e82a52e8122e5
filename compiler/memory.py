"""The process's peak memory (RSS high-water mark), resettable so each pass reports its own."""

from __future__ import annotations

from pathlib import Path


def reset_peak_rss() -> None:
    """Start a new high-water mark at the current RSS (Linux: ``/proc/self/clear_refs``); elsewhere a no-op."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float | None:
    """The RSS high-water mark since the last reset, in MiB (None where the OS does not say)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None
