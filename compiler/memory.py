"""The process's peak memory (RSS) over a block of work, so that each pass reports its own."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading
from pathlib import Path

import psutil

_MIB = 2**20


def _status_kib(*fields: str) -> list[int] | None:
    """Fields of /proc/self/status in KiB (None where there is no such file)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    values = {line.split(":")[0]: int(line.split()[1]) for line in lines if line.startswith(fields)}
    return [values[f] for f in fields] if all(f in values for f in fields) else None


# the highest of the kernel's high-water marks read before each reset, in KiB: the process's peak
# since it started is the larger of this and the current mark
_peak_before_resets_kib = 0


def process_peak_mb() -> float | None:
    """The process's peak RSS since it started, in MiB (None where the kernel does not say).

    ``PeakRss`` restarts the kernel's high-water mark for each block, so what ``getrusage`` and
    ``/usr/bin/time -v`` report afterwards is the peak since the last restart, not the process's."""
    marks = _status_kib("VmHWM")
    return None if marks is None else round(max(marks[0], _peak_before_resets_kib) / 1024, 1)


def _reset_high_water_mark() -> bool:
    """Restart the kernel's RSS high-water mark at the current RSS; False where it cannot be done.

    Linux does this on writing 5 to /proc/self/clear_refs; some sandboxes accept the write and ignore it,
    so the reset counts only once the high-water mark reads back as the current RSS."""
    global _peak_before_resets_kib
    before = _status_kib("VmHWM")
    if before is not None:
        _peak_before_resets_kib = max(_peak_before_resets_kib, before[0])
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    marks = _status_kib("VmHWM", "VmRSS")
    return marks is not None and marks[0] - marks[1] <= 1024


class PeakRss:
    """``with PeakRss() as peak: ...`` then ``peak.mb``: the peak RSS during the block, in MiB.

    Exact from the kernel's high-water mark where it can be reset; elsewhere sampled by a thread every
    ``interval_s`` (which misses only spikes shorter than that)."""

    interval_s = 0.005

    def __init__(self) -> None:
        self.mb: float | None = None
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._peak_bytes = 0

    def __enter__(self) -> PeakRss:
        if not _reset_high_water_mark():
            self._sampler = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        process = psutil.Process()
        while True:
            self._peak_bytes = max(self._peak_bytes, process.memory_info().rss)
            if self._stop.wait(self.interval_s):
                return

    def __exit__(self, *exc) -> None:
        if self._sampler is None:
            self.mb = round(_status_kib("VmHWM")[0] / 1024, 1)
            return
        self._stop.set()
        self._sampler.join()
        self._peak_bytes = max(self._peak_bytes, psutil.Process().memory_info().rss)
        self.mb = round(self._peak_bytes / _MIB, 1)


@functools.cache
def _glibc():
    """The C library when it is glibc (it has ``malloc_trim`` and ``mallopt``), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def release_freed_memory() -> None:
    """Give the memory freed into the C heap back to the system. A session that ends frees its graph
    and buffers in many small pieces, partly into its threads' arenas, and glibc keeps them: without
    this, every ONNX Runtime session of a compile left a few hundred MB behind (0.44 GB after a
    SmolLM2 session and its runs, in a one-off trace)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
# Blocks of this size or more get their own mapping, returned to the system when freed.
MMAP_THRESHOLD_BYTES = 4 * 2**20


def fix_mmap_threshold() -> None:
    """Give every block of ``MMAP_THRESHOLD_BYTES`` or more its own mapping, for the whole process.
    glibc's own threshold rises to the largest block freed so far (up to 32 MB): after a session's
    buffers are freed, the next session's land in the heap, where they outlive it. With SmolLM2 each
    verification session after the first then held 50-70 MB more (the compile's peak memory)."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def memory_shortfall(pass_name: str, held_bytes: int, multiple: float, mapped_bytes: int = 0,
                     mapped_multiple: float = 0.0, working_bytes: int = 0) -> str | None:
    """A warning when a pass's estimated need beyond what the process holds now, ``multiple`` times
    the weight bytes held in memory plus ``mapped_multiple`` times those memory-mapped from an
    external data file plus ``working_bytes`` of its own, exceeds the machine's available memory;
    None when it fits."""
    need = held_bytes * multiple + mapped_bytes * mapped_multiple + working_bytes
    free = psutil.virtual_memory().available
    if need <= free:
        return None
    gib = 2**30
    parts = [f"{m:g}x the {b / gib:.1f} GiB of weights {where}"
             for m, b, where in ((multiple, held_bytes, "in memory"), (mapped_multiple, mapped_bytes, "mapped from its data file"))
             if m * b >= need / 100]
    if working_bytes >= need / 100:
        parts.append(f"{working_bytes / gib:.1f} GiB of working memory")
    return (f"pass {pass_name} may need about {need / gib:.1f} GiB more memory ({', '.join(parts)}) but "
            f"{free / gib:.1f} GiB is available: it may be killed for memory; free memory, or compile on a "
            "machine with more")
