"""Weights streamed from disk: matrices left in a read-only memory map, decoded a block of rows at each use.

    mapped = MappedFile(path)                         the whole file, mapped read-only (file-backed pages)
    w = MappedWeight(mapped, start, shape, row_bytes, decode, perm=None)
    w.linear(x), w.linear_grad_input(g), w.rows(ids)  as every mesp.quant.FrozenWeight

Why a map: its pages belong to the page cache, not to the process, so they never count in the private
footprint (what a phone's phys_footprint measures). Why release them: a mapped page stays in the process's
resident set once touched, so after each use the weight's pages are dropped from this process
(madvise(MADV_DONTNEED) on a read-only file map discards nothing but the page-table entries; the next use
faults them back from the page cache or the disk). Resident weight pages therefore stay near one block of
rows, and `nbytes` (resident bytes) is 0.

The bytes of a row mean what the file format says: `decode(raw, dtype)` turns raw rows (uint8 [r, row_bytes],
a private copy) into dense rows [r, in] in dtype. The format module supplies it (mesp.formats.gguf), and it
calls the same dequantization formulas as the resident weights (mesp.quant.int4_dense / int8_dense), so a
streamed model computes bit for bit what the resident one does.
"""

from __future__ import annotations

import copy
import mmap
from collections.abc import Callable

import numpy as np
import torch

from .errors import MespError
from .quant import FrozenWeight


# A fault on a file map maps more than the page asked for: the fault-around window, and on recent Linux the whole
# page-cache folio holding the page (large folios, up to a PMD). Releases therefore cover the aligned PMD-sized
# spans around a range, so no page mapped along with it stays.
RELEASE_ALIGN = 2 << 20


class MappedFile:
    """A file memory-mapped read-only, shared by the weights that live in it."""

    def __init__(self, path):
        self.path = str(path)
        try:
            with open(path, "rb") as f:
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise MespError(f"{path}: cannot memory-map the file ({e})") from e
        self.size = len(self.map)

    def array(self, start: int, nbytes: int) -> np.ndarray:
        """A read-only uint8 view of bytes [start, start + nbytes) (nothing read until it is touched)."""
        if start < 0 or nbytes < 0 or start + nbytes > self.size:
            raise MespError(f"{self.path}: data at bytes [{start}, {start + nbytes}) lies beyond the file's "
                            f"{self.size} bytes")
        return np.frombuffer(self.map, dtype=np.uint8, count=nbytes, offset=start)

    def release(self, start: int, end: int) -> None:
        """Drop this process's pages of bytes [start, end) and of the aligned RELEASE_ALIGN spans around them (pages
        the kernel mapped in with them, which would otherwise stay); the data stay on disk."""
        if not hasattr(mmap, "MADV_DONTNEED") or end <= start:
            return  # no madvise here: pages stay until the kernel reclaims them (still file-backed, not private)
        lo = start // RELEASE_ALIGN * RELEASE_ALIGN
        hi = min(self.size, -(-end // RELEASE_ALIGN) * RELEASE_ALIGN)
        self.map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


class MappedWeight(FrozenWeight):
    """An [out, in] matrix left in a MappedFile: rows [n] of the model's matrix are rows perm[n] of the file
    (perm: a row permutation the file format applies, e.g. llama q/k), each `row_bytes` long from `start`."""

    def __init__(self, mapped: MappedFile, start: int, shape, row_bytes: int,
                 decode: Callable[[torch.Tensor, torch.dtype], torch.Tensor], perm: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32, device="cpu", row_align: int = 1):
        super().__init__(shape, dtype)
        self.mapped, self.start, self.row_bytes, self.decode = mapped, start, row_bytes, decode
        self.raw = mapped.array(start, self.shape[0] * row_bytes).reshape(self.shape[0], row_bytes)
        self.perm = None if perm is None else perm.numpy()
        self._device = torch.device(device)
        self.row_align = row_align  # the resident form's row blocks, so products sum in the same order

    @property
    def device(self):
        return self._device

    @property
    def nbytes(self):
        return 0  # the map's pages are file-backed and released after each use

    def to(self, device=None, dtype=None):
        new = copy.copy(self)
        new._device = torch.device(device) if device is not None else self._device
        new.dtype = dtype or self.dtype
        return new

    def _decoded(self, rows, dtype) -> torch.Tensor:
        """Dense file rows `rows` (a slice or an index array, in file order), their pages released after."""
        raw = torch.from_numpy(np.array(self.raw[rows]))  # the only copy of the raw bytes: r rows
        if isinstance(rows, slice):
            first, last = rows.start, rows.stop - 1
        else:
            first, last = int(rows.min()), int(rows.max())
        self.mapped.release(self.start + first * self.row_bytes, self.start + (last + 1) * self.row_bytes)
        return self.decode(raw, dtype).to(self._device)

    def dense_rows(self, n0, n1, dtype):
        return self._decoded(slice(n0, n1) if self.perm is None else self.perm[n0:n1], dtype)

    def read_rows(self, n0: int, n1: int) -> torch.Tensor:
        """Rows [n0, n1) in fp32 on CPU: a row source for loaders that quantize or copy block by block."""
        return self._decoded(slice(n0, n1) if self.perm is None else self.perm[n0:n1], torch.float32).cpu()

    def selected_rows(self, idx):
        idx = idx.cpu().numpy()
        return self._decoded(idx if self.perm is None else self.perm[idx], self.dtype)

    def dequantize(self, dtype=None):
        """The whole matrix, filled block of rows by block (no second full-size intermediate)."""
        dtype = dtype or self.dtype
        out = torch.empty(self.shape, dtype=dtype, device=self._device)
        for n0, n1 in self.row_blocks():
            out[n0:n1] = self.dense_rows(n0, n1, dtype)
        return out
