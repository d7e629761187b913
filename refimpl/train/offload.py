"""Training state in memory or offloaded to memory-mapped files, and its checkpoints.

A ``TensorSet`` contains named arrays (parameters, gradients or one Adam moment)
either in anonymous memory or in raw files under an offload folder, one file
per tensor, mapped shared and writable. Every access goes through row blocks
(``block``), which a ``Residency`` accounts under a budget: past it, the
least recently used blocks are dropped from the process with
``madvise(MADV_DONTNEED)``. On a shared file mapping that only unmaps the
pages; their contents stay in the page cache and the file, so the next access
reads the same bytes back. Only where bytes live changes, never the
arithmetic, so an offloaded run gives the same bits as a resident one.

Checkpoints are safetensors files written by ``refimpl.safetensors.save``: a
new temporary file renamed over the old one, so a file that is still mapped
is never rewritten. The offload files of a run live in a fresh subfolder that
is deleted when the run closes its state.
"""

import json
import mmap
import shutil
import uuid
from collections import OrderedDict
from pathlib import Path

import numpy as np

from refimpl.errors import RefimplError
from refimpl.safetensors import SafetensorsFile, save
from refimpl.store import DEFAULT_CHUNK_ROWS, MIB, StoreStats

PAGE = mmap.PAGESIZE
GROUPS = ("params", "grads", "exp_avg", "exp_avg_sq")


class Residency:
    """LRU accounting of the offloaded row blocks that were handed out, under ``budget_bytes``.

    NOTE: blocks are counted in whole pages, but on a fault the kernel may
    map neighbouring pages already in the page cache too (fault-around), so
    the measured RSS can exceed the accounted bytes by a few pages per block.
    """

    def __init__(self, budget_bytes=None):
        self.budget_bytes = budget_bytes
        self.stats = StoreStats()
        self._resident = OrderedDict()  # key -> (mapping, first_byte, last_byte)

    def touch(self, key, mapping, first_byte, last_byte):
        if key in self._resident:
            self._resident.move_to_end(key)
            self.stats.hits += 1
            return
        first = first_byte // PAGE * PAGE
        last = -(-last_byte // PAGE) * PAGE
        size = last - first
        if self.budget_bytes is not None:
            while self._resident and self.stats.resident_bytes + size > self.budget_bytes:
                self._evict(next(iter(self._resident)))
        self._resident[key] = (mapping, first, last)
        self.stats.misses += 1
        self.stats.bytes_read += last_byte - first_byte
        self.stats.resident_bytes += size
        self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes, self.stats.resident_bytes)

    def _evict(self, key):
        mapping, first, last = self._resident.pop(key)
        length = min(last, len(mapping)) - first
        if length > 0:
            mapping.madvise(mmap.MADV_DONTNEED, first, length)
        self.stats.resident_bytes -= last - first
        self.stats.evictions += 1

    def forget(self, mapping):
        """Drop the accounting of every block of ``mapping`` (before it is closed)."""
        for key in [k for k, entry in self._resident.items() if entry[0] is mapping]:
            _, first, last = self._resident.pop(key)
            self.stats.resident_bytes -= last - first


class TensorSet:
    """Named arrays of fixed shapes, in memory (``folder`` None) or in files under ``folder``."""

    def __init__(self, specs, folder=None, residency=None, chunk_rows=DEFAULT_CHUNK_ROWS):
        """``specs`` maps name -> (shape, dtype); arrays start as zeros."""
        self.specs = {name: (tuple(shape), np.dtype(dtype)) for name, (shape, dtype) in specs.items()}
        self.folder = Path(folder) if folder is not None else None
        self.residency = residency
        self.chunk_rows = chunk_rows
        self.arrays = {}
        self._mappings = {}
        if self.folder is None:
            for name, (shape, dtype) in self.specs.items():
                self.arrays[name] = np.zeros(shape, dtype=dtype)
            return
        self.folder.mkdir(parents=True, exist_ok=False)
        index = []
        for number, (name, (shape, dtype)) in enumerate(self.specs.items()):
            path = self.folder / f"{number:04d}.bin"
            nbytes = max(int(np.prod(shape)) * dtype.itemsize, 1)
            with open(path, "wb+") as file:
                file.truncate(nbytes)  # a sparse file of zeros
                mapping = mmap.mmap(file.fileno(), nbytes)
            self._mappings[name] = mapping
            self.arrays[name] = np.frombuffer(mapping, dtype=dtype, count=int(np.prod(shape))).reshape(shape)
            index.append({"name": name, "file": path.name, "shape": list(shape), "dtype": dtype.name})
        (self.folder / "index.json").write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")

    def names(self):
        return list(self.specs)

    def shape(self, name):
        return self.specs[name][0]

    def _check(self, name):
        if name not in self.arrays:
            raise RefimplError(f"tensor {name!r} is not in the training state")

    def block(self, name, start, stop):
        """Return a writable view of rows [start, stop) of ``name``, accounted under the budget when offloaded."""
        self._check(name)
        array = self.arrays[name]
        if array.ndim == 0:
            return array
        view = array[start:stop]
        if self.folder is not None and self.residency is not None and view.nbytes:
            row_bytes = array.strides[0]
            self.residency.touch((id(self), name, start, stop), self._mappings[name],
                                 start * row_bytes, stop * row_bytes)
        return view

    def array(self, name):
        """Return the whole tensor after touching it block by block, so the budget accounting stays current."""
        self._check(name)
        rows = self.shape(name)[0] if self.shape(name) else 1
        for start in range(0, rows, self.chunk_rows):
            self.block(name, start, min(rows, start + self.chunk_rows))
        return self.arrays[name]

    def blocks(self, name):
        """Yield (start, stop, view) over row blocks of ``chunk_rows``, or one block when in memory."""
        shape = self.shape(name)
        rows = shape[0] if shape else 1
        if self.folder is None:
            yield 0, rows, self.block(name, 0, rows)
            return
        for start in range(0, rows, self.chunk_rows):
            stop = min(rows, start + self.chunk_rows)
            yield start, stop, self.block(name, start, stop)

    def zero(self):
        for name in self.specs:
            for _, _, view in self.blocks(name):
                view[...] = 0

    def close(self):
        self.arrays = {}
        for mapping in self._mappings.values():
            if self.residency is not None:
                self.residency.forget(mapping)
        self._mappings = {}
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


class ParameterStore:
    """The parameters of a ``TensorSet`` served through the interface of ``refimpl.store.WeightStore``.

    A model written against WeightStore (chunks, tensor, rows, release,
    set_execution_order) runs on trainable parameters unchanged.
    """

    def __init__(self, tensors):
        self.tensors = tensors
        self.index = {name: tensors.shape(name) for name in tensors.names()}
        self.chunk_rows = tensors.chunk_rows
        self.requested_chunk_rows = tensors.chunk_rows
        self.schedule = "budget" if tensors.residency is not None and tensors.residency.budget_bytes else "resident"
        self.budget_bytes = tensors.residency.budget_bytes if tensors.residency is not None else None
        self.stats = tensors.residency.stats if tensors.residency is not None else StoreStats()

    def names(self):
        return list(self.index)

    def shape(self, name):
        if name not in self.index:
            raise RefimplError(f"weight {name!r} is not in the training state")
        return self.index[name]

    def set_execution_order(self, names):
        """Accepted for the WeightStore interface; offloaded blocks are not prefetched."""

    def release(self, layer_prefix):
        """Accepted for the WeightStore interface; the residency budget does the evicting."""

    def chunks(self, name):
        """Yield (first_row, stop_row, view) for each chunk of ``chunk_rows`` rows, in row order."""
        shape = self.shape(name)
        rows = shape[0] if shape else 1
        for start in range(0, rows, self.chunk_rows):
            stop = min(rows, start + self.chunk_rows)
            yield start, stop, self.tensors.block(name, start, stop)

    def tensor(self, name):
        return self.tensors.array(name)

    def rows(self, name, ids):
        ids = np.asarray(ids, dtype=np.int64)
        rows = self.shape(name)[0]
        if ids.size and (ids.min() < 0 or ids.max() >= rows):
            bad = ids[(ids < 0) | (ids >= rows)][0]
            raise RefimplError(f"row {bad} is out of range for {name!r} with {rows} rows")
        table = self.tensors.array(name)
        return table[ids]


class TrainingState:
    """Parameters, gradients and AdamW moments, resident or offloaded under one budget."""

    def __init__(self, specs, offload_dir=None, budget_bytes=None, chunk_rows=DEFAULT_CHUNK_ROWS):
        if budget_bytes is not None and offload_dir is None:
            raise RefimplError("a residency budget needs an offload folder; pass --offload-dir DIR")
        self.run_folder = None
        self.residency = Residency(budget_bytes) if offload_dir is not None else None
        if offload_dir is not None:
            if budget_bytes is not None:
                widest_row = max(int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
                                 for shape, dtype in specs.values() if shape)
                # Four blocks (parameter, gradient and two moments) are in use at once.
                rows = (budget_bytes // 4 - 2 * PAGE) // max(widest_row, 1)
                if rows < 1:
                    raise RefimplError(
                        f"budget of {budget_bytes / MIB:g} MiB is too small: four rows of "
                        f"{widest_row} bytes plus page rounding must fit; raise --budget-mib")
                chunk_rows = min(chunk_rows, int(rows))
            self.run_folder = Path(offload_dir) / f"run-{uuid.uuid4().hex[:12]}"
            self.run_folder.parent.mkdir(parents=True, exist_ok=True)
        self.groups = {}
        for group in GROUPS:
            folder = self.run_folder / group if self.run_folder is not None else None
            self.groups[group] = TensorSet(specs, folder, self.residency, chunk_rows)
        self.params = self.groups["params"]
        self.grads = self.groups["grads"]
        self.exp_avg = self.groups["exp_avg"]
        self.exp_avg_sq = self.groups["exp_avg_sq"]
        self.store = ParameterStore(self.params)

    def names(self):
        return self.params.names()

    def load_params(self, tensors):
        """Copy ``tensors`` (name -> array) into the parameters, block by block."""
        for name in self.names():
            if name not in tensors:
                raise RefimplError(f"parameter {name!r} is missing from the initial weights")
            source = tensors[name]
            for start, stop, view in self.params.blocks(name):
                view[...] = source[start:stop] if view.ndim else source

    def close(self):
        for tensors in self.groups.values():
            tensors.close()
        if self.run_folder is not None:
            shutil.rmtree(self.run_folder, ignore_errors=True)


# ---- checkpoints ---------------------------------------------------------------------

MOMENT_PREFIXES = {"exp_avg": "optimizer.exp_avg.", "exp_avg_sq": "optimizer.exp_avg_sq."}


def save_checkpoint(path, state, metadata):
    """Write parameters and AdamW moments to ``path`` atomically, with string ``metadata``.

    NOTE: save() gathers the arrays into one file, so an offloaded state is
    read through once; the pages it touches are not counted under the budget.
    """
    tensors = {name: state.params.arrays[name] for name in state.names()}
    for group, prefix in MOMENT_PREFIXES.items():
        for name in state.names():
            tensors[prefix + name] = state.groups[group].arrays[name]
    save(path, tensors, {key: str(value) for key, value in metadata.items()})


def load_checkpoint(path, state):
    """Copy parameters and moments from a checkpoint into ``state``; return its metadata."""
    path = Path(path)
    if not path.is_file():
        raise RefimplError(f"{path}: checkpoint not found; train without --resume first")
    with SafetensorsFile(path) as file:
        for name in state.names():
            sources = {"params": name, **{g: p + name for g, p in MOMENT_PREFIXES.items()}}
            for group, stored in sources.items():
                if stored not in file.tensors:
                    raise RefimplError(f"{path}: tensor {stored!r} is missing; the checkpoint does not "
                                       "belong to this model")
                source = file.array(stored)
                for start, stop, view in state.groups[group].blocks(name):
                    view[...] = source[start:stop] if view.ndim else source
        return dict(file.metadata)
