"""A model's outputs over many batches, held in bounded memory.

The pass manager keeps one stage's outputs on the verification batches to compare the next
stage with. A decoder's logits over a large vocabulary take gigabytes there (SmolLM2: 49,152
floats per token), several times the model. :class:`OutputStore` keeps the first batches in
memory up to an allowance and writes the rest to a temporary folder, read back one batch at a
time when asked for, so comparing two stages holds one batch of each.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

# Outputs held in memory before the store writes batches to disk: little, since a compile holds two
# stores (the reference and the stage being verified) beside each session it runs.
MEMORY_BYTES = 8 * 2**20


class OutputStore(Sequence[dict[str, np.ndarray]]):
    """One ``{output name: array}`` dict per batch, in order; a sequence like the list
    ``run_batches`` returns. Batches past ``memory_bytes`` (default ``MEMORY_BYTES``) live in
    ``.npy`` files of a temporary folder that goes with the store."""

    def __init__(self, memory_bytes: int | None = None):
        self.memory_bytes = MEMORY_BYTES if memory_bytes is None else memory_bytes
        self.held_bytes = 0  # in memory
        self.spilled_bytes = 0  # on disk
        self._batches: list[dict[str, np.ndarray] | dict[str, Path]] = []
        self._folder: Path | None = None

    @classmethod
    def of(cls, batches: Iterable[Mapping[str, np.ndarray]], memory_bytes: int | None = None) -> OutputStore:
        """A store of ``batches``, consumed one at a time (a generator is never held whole)."""
        store = cls(memory_bytes)
        for arrays in batches:
            store.append(arrays)
            del arrays  # before the next batch is run (``runtime.iter_batches``)
        return store

    def append(self, arrays: Mapping[str, np.ndarray]) -> None:
        size = sum(a.nbytes for a in arrays.values())
        if self.held_bytes + size <= self.memory_bytes:
            # copies: an array ONNX Runtime returned can keep its session's whole memory arena alive
            self._batches.append({name: np.array(a, copy=True) for name, a in arrays.items()})
            self.held_bytes += size
            return
        folder = self._spill_folder()
        paths = {}
        for j, (name, array) in enumerate(arrays.items()):
            paths[name] = folder / f"{len(self._batches)}_{j}.npy"
            np.save(paths[name], array, allow_pickle=False)
        self._batches.append(paths)
        self.spilled_bytes += size

    def _spill_folder(self) -> Path:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="onnxpress-outputs-"))
            weakref.finalize(self, shutil.rmtree, self._folder, ignore_errors=True)
        return self._folder

    def __len__(self) -> int:
        return len(self._batches)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        batch = self._batches[index]
        return {name: np.load(v, allow_pickle=False) if isinstance(v, Path) else v for name, v in batch.items()}

