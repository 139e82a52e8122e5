"""Peak memory over a block: the kernel's resettable high-water mark, or sampling where it cannot be reset."""

import contextlib
import mmap
import time

import numpy as np
import pytest

import onnxpress.memory
from onnxpress.memory import PeakRss


@contextlib.contextmanager
def fresh_pages(mib: int):
    """``mib`` MiB of newly mapped pages, all written, unmapped on exit: an array from malloc may
    reuse memory freed earlier in the process and never raise its RSS."""
    block = mmap.mmap(-1, mib << 20)
    view = np.frombuffer(block, np.uint8)
    view.fill(1)
    del view
    try:
        time.sleep(0.05)  # several sampling intervals
        yield
    finally:
        block.close()


def test_a_reset_the_kernel_ignores_is_noticed(monkeypatch):
    """Some sandboxes accept the write to clear_refs and keep the old mark: that must not count as a reset."""
    monkeypatch.setattr(onnxpress.memory, "_status_kib", lambda *fields: [900_000, 300_000])
    assert not onnxpress.memory._reset_high_water_mark()


@pytest.mark.parametrize("resettable", [True, False])
def test_the_peak_covers_an_allocation_inside_the_block_only(monkeypatch, resettable):
    if not resettable:
        monkeypatch.setattr(onnxpress.memory, "_reset_high_water_mark", lambda: False)
    with PeakRss() as inside, fresh_pages(200):
        pass
    with PeakRss() as after:
        pass
    assert inside.mb > after.mb + 150


def test_the_process_peak_outlasts_the_resets_of_the_blocks_after_it():
    """``/usr/bin/time`` reads the kernel's mark, which each block restarts; the report reads this."""
    with PeakRss() as block, fresh_pages(200):
        pass
    with PeakRss() as later:
        pass
    assert onnxpress.memory.process_peak_mb() >= block.mb > later.mb + 150


def test_memory_freed_into_the_c_heap_is_given_back():
    import ctypes
    import ctypes.util

    import psutil

    if onnxpress.memory._glibc() is None:
        pytest.skip("not glibc: no malloc_trim")
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    size = 64 * 1024  # below glibc's mmap threshold: from the heap
    chunks = [libc.malloc(size) for _ in range(3000)]
    for chunk in chunks:
        ctypes.memset(chunk, 1, size)
    top = chunks.pop()  # in use above the others: free alone cannot shrink the heap
    for chunk in chunks:
        libc.free(chunk)
    before = psutil.Process().memory_info().rss
    onnxpress.memory.release_freed_memory()
    after = psutil.Process().memory_info().rss
    libc.free(top)
    assert before - after > 100 * 2**20


_BLOCKS_FREED = """
import ctypes, ctypes.util, sys
import psutil
import onnxpress.memory
if sys.argv[1] == "fixed":
    onnxpress.memory.fix_mmap_threshold()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
def touched(size):
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    return block
libc.free(touched(24 * 2**20))  # freeing a large block raises glibc's own threshold past 8 MB
blocks, pins = [], []
for _ in range(12):  # each followed by a small block still in use: the heap cannot shrink past it
    blocks.append(touched(8 * 2**20))
    pins.append(touched(64 * 1024))
before = psutil.Process().memory_info().rss
for block in blocks:
    libc.free(block)
print((before - psutil.Process().memory_info().rss) // 2**20)
"""


def test_blocks_past_the_fixed_threshold_go_back_to_the_system_when_freed():
    """With glibc's own threshold, 8 MB blocks allocated after a 24 MB one was freed come from the
    heap and stay after they are freed; with the fixed one, each has its own mapping."""
    import subprocess
    import sys

    if onnxpress.memory._glibc() is None:
        pytest.skip("not glibc: no mallopt")
    given_back = {mode: int(subprocess.run([sys.executable, "-c", _BLOCKS_FREED, mode], capture_output=True,
                                           text=True, check=True).stdout)
                  for mode in ("glibc", "fixed")}
    assert given_back["fixed"] >= 90 and given_back["glibc"] < 10, given_back
