"""Outputs kept past a memory allowance on disk, and a compile that compares its stages from there."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from onnxpress import output_store
from onnxpress.compile import compile_model
from onnxpress.fidelity import compare_outputs
from onnxpress.output_store import OutputStore
from tests.tiny_models import VOCAB, tiny_model


def _batches(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"logits": rng.standard_normal((2, 5, 7)).astype(np.float32), "ids": np.arange(3 + i)} for i in range(n)]


def test_batches_past_the_allowance_are_read_back_from_disk_and_removed_with_the_store():
    batches = _batches(4)
    one = sum(a.nbytes for a in batches[0].values())
    store = OutputStore.of(iter(batches), memory_bytes=one)  # the first batch stays in memory
    assert len(store) == 4 and store.held_bytes == one and store.spilled_bytes > 0
    folder = store._folder
    assert len(list(folder.iterdir())) == 2 * 3
    for got, want in zip(store, batches, strict=True):
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
            assert got[name].dtype == want[name].dtype
    assert [b["ids"].size for b in store[1:3]] == [4, 5]
    del store
    gc.collect()
    assert not folder.exists()


def test_comparing_a_stored_run_equals_comparing_lists():
    refs, news = _batches(3), _batches(3, seed=1)
    stored = OutputStore.of(refs, memory_bytes=0)
    assert compare_outputs(stored, iter(news)) == compare_outputs(refs, news)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_a_compile_whose_stage_outputs_spill_to_disk_reports_the_same(arch, tmp_path, monkeypatch):
    """The pass manager's reference outputs and each stage's, all on disk, measure every stage
    as they do in memory."""
    src = tiny_model(arch)
    calib = tmp_path / "ids.npz"
    np.savez(calib, input_ids=np.random.default_rng(0).integers(5, VOCAB, (16, 32)))
    passes = ["cleanup", "prune_ffn:fraction=0.25", "quantize:mode=weight_only,bits=8"]
    reports, spills = {}, []
    spill_folder = OutputStore._spill_folder
    monkeypatch.setattr(OutputStore, "_spill_folder", lambda store: spills.append(1) or spill_folder(store))
    for memory in (output_store.MEMORY_BYTES, 0):
        monkeypatch.setattr(output_store, "MEMORY_BYTES", memory)
        reports[memory] = compile_model(src, tmp_path / f"{memory}.onnx", passes=passes, calib=[calib],
                                        progress=False, threads=1)
        assert bool(spills) == (memory == 0)
    in_memory_run = next(r for m, r in reports.items() if m)
    for in_memory, on_disk in zip(in_memory_run.passes, reports[0].passes, strict=True):
        assert on_disk.modified == in_memory.modified
        assert on_disk.measured_error == pytest.approx(in_memory.measured_error, rel=1e-6, abs=1e-9)
        assert on_disk.vs_input == pytest.approx(in_memory.vs_input, rel=1e-6)


def test_batches_held_in_memory_are_copies_of_what_was_appended():
    """An array ONNX Runtime returns can keep its session's whole memory arena alive."""
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    store = OutputStore.of([{"x": array}])
    assert store.held_bytes == array.nbytes and not np.shares_memory(store[0]["x"], array)
    np.testing.assert_array_equal(store[0]["x"], array)
