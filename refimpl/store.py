"""The chunked weight store: weights served as row-block views of memory-mapped files.

A weight of shape [out_features, in_features] is served as chunks of
``chunk_rows`` rows, each a zero-copy view of the mapped safetensors file
(a copy only for BF16 or unaligned tensors, one chunk at a time). The store
counts the memory that the chunks it has handed out may have made resident,
in aligned blocks of BLOCK_SIZE, and keeps that count under a budget. Past the
budget, the least recently used chunks are evicted. Blocks that no resident
chunk covers any more are released with ``madvise(MADV_DONTNEED)``, which drops
them from this process's resident set (``posix_madvise`` would not, because it
is a no-op on Linux).

Schedules, named as in the CLI:

- ``resident``: no budget, nothing is evicted.
- ``layer``: everything of a layer is released once the layer is done
  (``release``), so about one layer is resident at a time.
- ``budget``: LRU eviction under ``budget_bytes``.

Chunks next in execution order are prefetched with ``MADV_WILLNEED``, which
asks the kernel to read them ahead; the prefetched chunks count against the
budget. Only where bytes come from changes between schedules: the arithmetic
does not, so every schedule gives bitwise identical results.
"""

import mmap
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refimpl.errors import RefimplError
from refimpl.safetensors import SUPPORTED_DTYPES, SafetensorsFile

# Residency is accounted in aligned blocks of 2 MiB, not 4 KiB pages. On a
# fault the kernel maps more than the faulting page: its fault-around window
# (64 KiB by default) or a whole large folio of the page cache, up to 2 MiB (a
# PMD) on Linux 6.x. A file written in large pieces gets such folios, so
# touching one byte can map 2 MiB. Counting whole aligned blocks keeps the
# accounted bytes an upper bound of what a chunk can make resident.
MIB = 1 << 20
BLOCK_SIZE = 2 * MIB
SCHEDULES = ("resident", "layer", "budget")
DEFAULT_CHUNK_ROWS = 1024


@dataclass
class StoreStats:
    """Counters of a weight store; bytes are whole blocks of BLOCK_SIZE."""

    bytes_read: int = 0  # weight bytes of the chunks brought in on misses and prefetches
    hits: int = 0
    misses: int = 0
    prefetches: int = 0
    evictions: int = 0
    resident_bytes: int = 0
    peak_resident_bytes: int = 0

    def as_dict(self):
        return dict(self.__dict__)


@dataclass
class _Chunk:
    key: tuple  # (tensor name, chunk index)
    file: SafetensorsFile
    first_block: int
    last_block: int  # exclusive
    nbytes: int
    layer: str

    @property
    def blocks(self):
        return self.last_block - self.first_block


class _BlockCounts:
    """How many resident chunks cover each block (BLOCK_SIZE) of one mapped file."""

    def __init__(self, file_size):
        self.counts = np.zeros((file_size + BLOCK_SIZE - 1) // BLOCK_SIZE, dtype=np.int32)

    def add(self, first, last):
        """Count one more chunk on blocks [first, last); return how many blocks became resident."""
        span = self.counts[first:last]
        newly = int(np.count_nonzero(span == 0))
        span += 1
        return newly

    def remove(self, first, last):
        """Count one chunk less on blocks [first, last)."""
        self.counts[first:last] -= 1

    def uncovered_runs(self, first, last):
        """Return the runs [start, stop) of blocks in [first, last) that no chunk covers."""
        first = max(first, 0)
        last = min(last, len(self.counts))
        free = np.flatnonzero(self.counts[first:last] == 0)
        if free.size == 0:
            return []
        breaks = np.flatnonzero(np.diff(free) != 1)
        starts = np.concatenate(([free[0]], free[breaks + 1]))
        stops = np.concatenate((free[breaks], [free[-1]])) + 1
        return [(first + int(a), first + int(b)) for a, b in zip(starts, stops)]


def layer_of(name):
    """Return the layer prefix of a weight name ("encoder.layer.3." for "encoder.layer.3.output.dense.weight")."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1]) + "."
    return ""


class WeightStore:
    """Serve the tensors of one or more safetensors files as chunk views under a budget."""

    def __init__(self, paths, chunk_rows=DEFAULT_CHUNK_ROWS, budget_bytes=None,
                 schedule=None, prefetch=1):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        if schedule is None:
            schedule = "budget" if budget_bytes is not None else "resident"
        if schedule not in SCHEDULES:
            raise RefimplError(f"schedule {schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
        if chunk_rows < 1:
            raise RefimplError(f"chunk rows {chunk_rows} is invalid; use 1 or more")
        if schedule == "budget" and (budget_bytes is None or budget_bytes <= 0):
            raise RefimplError("the budget schedule needs a budget of more than 0 bytes")

        self.files = [SafetensorsFile(Path(p)) for p in paths]
        self.index = {}
        for file in self.files:
            for name, info in file.tensors.items():
                self.index[name] = (file, info)
        self._blocks = {id(file): _BlockCounts(os.path.getsize(file.path)) for file in self.files}

        self.schedule = schedule
        self.budget_bytes = budget_bytes if schedule == "budget" else None
        self.prefetch = max(0, int(prefetch))
        self.chunk_rows = int(chunk_rows)
        self._clamp_chunk_rows()

        self.stats = StoreStats()
        self._resident = OrderedDict()  # chunk key -> _Chunk, least recently used first
        self._order = []  # chunk keys in execution order, for prefetching
        self._position = {}  # chunk key -> index in _order

    # ---- layout -------------------------------------------------------------

    def _clamp_chunk_rows(self):
        """Shrink chunk_rows so that 1 + prefetch chunks of the widest weight fit in the budget.

        The result does not depend on the chunk size (the kernels fix the
        reduction order), so this only changes how the bytes are fetched.
        """
        self.requested_chunk_rows = self.chunk_rows
        if self.budget_bytes is None:
            return
        widest_row = max((info.row_nbytes for _, info in self.index.values()), default=1)
        in_flight = 1 + self.prefetch
        # A chunk of at most k blocks' bytes touches at most k + 1 blocks, so a
        # share of k + 1 whole blocks per chunk in flight always suffices.
        share_blocks = self.budget_bytes // in_flight // BLOCK_SIZE
        rows = ((share_blocks - 1) * BLOCK_SIZE) // max(widest_row, 1)
        if rows < 1:
            need = in_flight * (-(-widest_row // BLOCK_SIZE) + 1) * BLOCK_SIZE
            raise RefimplError(
                f"budget of {self.budget_bytes / MIB:g} MiB is too small: with prefetch {self.prefetch}, "
                f"{in_flight} chunks of at least one row must fit, which takes {need / MIB:g} MiB "
                f"(residency is counted in {BLOCK_SIZE // MIB} MiB blocks); raise the budget or lower prefetch")
        self.chunk_rows = min(self.chunk_rows, int(rows))

    def names(self):
        return list(self.index)

    def info(self, name):
        try:
            return self.index[name][1]
        except KeyError:
            raise RefimplError(f"weight {name!r} is not in {self._describe_files()}") from None

    def _describe_files(self):
        return ", ".join(str(f.path) for f in self.files)

    def shape(self, name):
        return self.info(name).shape

    def n_chunks(self, name):
        rows = self.info(name).shape[0] if self.info(name).shape else 1
        return max(1, -(-rows // self.chunk_rows))

    def chunk_bounds(self, name, index):
        info = self.info(name)
        rows = info.shape[0] if info.shape else 1
        start = index * self.chunk_rows
        return start, min(rows, start + self.chunk_rows)

    def set_execution_order(self, names):
        """Declare the order in which weights are used, so the next chunks can be prefetched."""
        self._order = [(n, c) for n in names for c in range(self.n_chunks(n))]
        self._position = {key: i for i, key in enumerate(self._order)}

    # ---- residency ----------------------------------------------------------

    def _make_chunk(self, key):
        name, index = key
        file, info = self.index[name]
        start, stop = self.chunk_bounds(name, index)
        row = info.row_nbytes
        first_byte = info.start + start * row
        last_byte = info.start + stop * row if info.shape else info.end
        first_block = first_byte // BLOCK_SIZE
        last_block = max(first_block, (last_byte + BLOCK_SIZE - 1) // BLOCK_SIZE)
        return _Chunk(key, file, first_block, last_block, last_byte - first_byte, layer_of(name))

    def _admit(self, key, keep=()):
        """Account chunk ``key`` as resident, evicting others to stay in the budget."""
        chunk = self._make_chunk(key)
        if self.budget_bytes is not None:
            # Evict least recently used chunks until the new one fits.
            while (self._resident and
                   self.stats.resident_bytes + chunk.blocks * BLOCK_SIZE > self.budget_bytes):
                victim = next((k for k in self._resident if k not in keep and k != key), None)
                if victim is None:
                    break
                self._evict(victim)
        newly = self._blocks[id(chunk.file)].add(chunk.first_block, chunk.last_block)
        self._resident[key] = chunk
        self.stats.resident_bytes += newly * BLOCK_SIZE
        self.stats.bytes_read += chunk.nbytes
        self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes, self.stats.resident_bytes)
        return chunk

    def _evict(self, key):
        chunk = self._resident.pop(key)
        blocks = self._blocks[id(chunk.file)]
        blocks.remove(chunk.first_block, chunk.last_block)
        mapping = chunk.file.mmap
        for first, last in blocks.uncovered_runs(chunk.first_block, chunk.last_block):
            self.stats.resident_bytes -= (last - first) * BLOCK_SIZE
            if mapping is not None:
                length = min(last * BLOCK_SIZE, len(mapping)) - first * BLOCK_SIZE
                if length > 0:
                    mapping.madvise(mmap.MADV_DONTNEED, first * BLOCK_SIZE, length)
        self.stats.evictions += 1

    def _prefetch_after(self, key):
        position = self._position.get(key)
        if position is None:
            return
        keep = {key}
        for upcoming in self._order[position + 1: position + 1 + self.prefetch]:
            keep.add(upcoming)
            if upcoming in self._resident:
                continue
            chunk = self._admit(upcoming, keep=keep)
            self.stats.prefetches += 1
            mapping = chunk.file.mmap
            if mapping is not None:
                start = chunk.first_block * BLOCK_SIZE
                length = min(chunk.last_block * BLOCK_SIZE, len(mapping)) - start
                if length > 0:
                    mapping.madvise(mmap.MADV_WILLNEED, start, length)

    def _touch(self, key):
        if key in self._resident:
            self._resident.move_to_end(key)
            self.stats.hits += 1
        else:
            self._admit(key)
            self.stats.misses += 1
        if self.prefetch:
            self._prefetch_after(key)

    def release(self, layer_prefix):
        """End of a layer: under the layer schedule, evict every chunk of that layer."""
        if self.schedule != "layer":
            return
        for key in [k for k, c in self._resident.items() if c.layer == layer_prefix]:
            self._evict(key)

    def release_all(self):
        """Evict every chunk unless the schedule is resident."""
        if self.schedule == "resident":
            return
        for key in list(self._resident):
            self._evict(key)

    # ---- access -------------------------------------------------------------

    def chunks(self, name):
        """Yield (first_row, stop_row, view) for each chunk of a weight, in row order."""
        file, info = self.index.get(name, (None, None))
        if info is None:
            self.info(name)  # raises the error naming the files
        for index in range(self.n_chunks(name)):
            self._touch((name, index))
            start, stop = self.chunk_bounds(name, index)
            if info.shape:
                yield start, stop, file.rows(name, start, stop)
            else:
                yield 0, 1, file.array(name)

    def tensor(self, name):
        """Return a whole small tensor (a bias, a norm weight): a view when it fits in one chunk."""
        parts = [view for _, _, view in self.chunks(name)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def rows(self, name, ids):
        """Gather rows ``ids`` of a weight (an embedding lookup) into a new array: [len(ids), ...]."""
        ids = np.asarray(ids, dtype=np.int64)
        file, info = self.index.get(name, (None, None))
        if info is None:
            self.info(name)
        n_rows = info.shape[0]
        if ids.size and (ids.min() < 0 or ids.max() >= n_rows):
            bad = ids[(ids < 0) | (ids >= n_rows)][0]
            raise RefimplError(f"row {bad} is out of range for {name!r} with {n_rows} rows")
        out = np.empty((ids.size,) + tuple(info.shape[1:]), dtype=SUPPORTED_DTYPES[info.dtype])
        by_chunk = ids // self.chunk_rows
        for index in np.unique(by_chunk):
            self._touch((name, int(index)))
            start, stop = self.chunk_bounds(name, int(index))
            view = file.rows(name, start, stop)
            selected = np.flatnonzero(by_chunk == index)
            out[selected] = view[ids[selected] - start]
        return out

    def close(self):
        self._resident.clear()
        for file in self.files:
            file.close()
