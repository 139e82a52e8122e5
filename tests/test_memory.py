"""Peak memory over a block: the kernel's resettable high-water mark, or sampling where it cannot be reset."""

import time

import numpy as np
import pytest

import onnxpress.memory
from onnxpress.memory import PeakRss


def test_a_reset_the_kernel_ignores_is_noticed(monkeypatch):
    """Some sandboxes accept the write to clear_refs and keep the old mark: that must not count as a reset."""
    monkeypatch.setattr(onnxpress.memory, "_status_kib", lambda *fields: [900_000, 300_000])
    assert not onnxpress.memory._reset_high_water_mark()


@pytest.mark.parametrize("resettable", [True, False])
def test_the_peak_covers_an_allocation_inside_the_block_only(monkeypatch, resettable):
    if not resettable:
        monkeypatch.setattr(onnxpress.memory, "_reset_high_water_mark", lambda: False)
    with PeakRss() as inside:
        block = np.ones(25_000_000)  # 200 MB, every page written
        time.sleep(0.05)  # several sampling intervals
        del block
    with PeakRss() as after:
        pass
    assert inside.mb > after.mb + 150
