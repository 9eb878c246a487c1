"""Activation checkpoints of one step (each decoder layer's input), held in RAM or in a memory-mapped scratch file.

The engines that keep checkpoints across layers (MeSP, MeBP) store each layer's input with `put` during the
forward and take it back with `pop` during the backward, in reverse order. `LayerCheckpoints(like, n, None)`
keeps the tensors themselves, as a list would. With a directory, every checkpoint is copied into its own slot
of one scratch file there:

- the file gets a unique name, is sized with posix_fallocate (a full disk fails before the step, with a
  one-line MespError, instead of a SIGBUS when a page is first written), mapped MAP_SHARED and **unlinked at
  once**: nothing is left in the directory at exit, even after an error or SIGKILL, and its blocks return to
  the filesystem when the mapping goes;
- the mapping is shared and file-backed, so written pages are page cache, never private memory; after a
  checkpoint is written its pages are written back (msync) and dropped from the process (MADV_DONTNEED, which
  on a shared file mapping keeps the data in the file), and a slot handed to the backward is dropped again once
  the next one is popped, so resident checkpoint pages stay near one layer;
- a directory on tmpfs/ramfs gets a warning: there the file's pages are shared memory, which the private
  footprint counts.

The slots hold the bytes of the original tensors, so the gradients are bit for bit those of the RAM path.
"""

from __future__ import annotations

import logging
import mmap
import os
import sys
import tempfile

import torch

from .errors import MespError

log = logging.getLogger(__name__)

MEMORY_FILESYSTEMS = ("tmpfs", "ramfs")
SCRATCH_PREFIX = "mesp-checkpoints-"


def filesystem_type(path) -> str | None:
    """The type of the filesystem holding `path` ("ext4", "tmpfs", ...): the /proc/mounts entry with the longest
    mount point containing it. None where /proc/mounts is absent (not Linux)."""
    target = os.path.realpath(path)
    best, best_type = "", None
    try:
        with open("/proc/mounts", encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = unescape_mount_field(fields[1])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, best_type = point, fields[2]
    return best_type


def unescape_mount_field(text: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash in paths as octal escapes (\\040 ...)."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        text = text.replace(code, chr(int(code[1:], 8)))
    return text


def require_scratch_directory(directory) -> None:
    """MespError (one line) unless `directory` is an existing directory this process may create files in."""
    d = os.fspath(directory)
    if not os.path.isdir(d):
        raise MespError(f"scratch directory {d}: " + ("not a directory" if os.path.exists(d) else "does not exist"))
    if not os.access(d, os.W_OK | os.X_OK):
        raise MespError(f"scratch directory {d}: not writable")


class ScratchFile:
    """`nbytes` of a new, already unlinked file in `directory`, mapped shared and writable.

    `tensor(offset, shape, dtype)` views part of it; `write_back(offset, n)` and `drop(offset, n)` move a range's
    pages out of the process. `close()` unmaps it once no view is alive (a live view, e.g. held by an exception's
    traceback, keeps the mapping until it is collected; the file's name is gone either way)."""

    def __init__(self, directory, nbytes: int):
        d = os.fspath(directory)
        require_scratch_directory(d)
        fstype = filesystem_type(d)
        if fstype in MEMORY_FILESYSTEMS:
            log.warning("scratch directory %s is on %s: its pages are shared memory and count in the private "
                        "footprint; choose a directory on a disk", d, fstype)
        try:
            fd, path = tempfile.mkstemp(prefix=SCRATCH_PREFIX, suffix=".bin", dir=d)
        except OSError as e:
            raise MespError(f"scratch directory {d}: cannot create a file there ({e.strerror})") from e
        try:
            try:
                os.posix_fallocate(fd, 0, max(nbytes, 1))
            except OSError as e:
                raise MespError(f"scratch directory {d}: cannot reserve {nbytes / (1 << 20):.1f} MiB for the "
                                f"activation checkpoints ({e.strerror})") from e
            self.map = mmap.mmap(fd, max(nbytes, 1), flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:  # the name goes at once: nothing is left behind, whatever happens to the process later
            os.unlink(path)
            os.close(fd)
        self.directory, self.nbytes = d, nbytes

    def tensor(self, offset: int, shape, dtype: torch.dtype) -> torch.Tensor:
        count = 1
        for n in shape:
            count *= n
        return torch.frombuffer(self.map, dtype=dtype, count=count, offset=offset).view(shape)

    def write_back(self, offset: int, nbytes: int) -> None:
        self.map.flush(offset, nbytes)

    def drop(self, offset: int, nbytes: int) -> None:
        """Take the range's pages out of the process; on a shared file mapping the data stays in the file (and
        the page cache), and the next read faults it back in."""
        self.map.madvise(mmap.MADV_DONTNEED, offset, nbytes)

    def close(self) -> None:
        # torch.frombuffer's storage holds a reference to the map: unmapping under a live view would make
        # reading it a segfault, so unmap only when this object's reference (and getrefcount's) are the last
        if self.map is None:
            return
        if sys.getrefcount(self.map) <= 2:
            self.map.close()
        else:
            log.debug("scratch file in %s: views still alive; unmapped when they are collected", self.directory)
        self.map = None


def page_align(n: int) -> int:
    return -(-n // mmap.PAGESIZE) * mmap.PAGESIZE


class LayerCheckpoints:
    """One [B, T, d] checkpoint per layer, `put` in the forward and `pop`ped in the backward.

    like: a tensor with the checkpoints' shape, dtype and device (the embeddings' output). directory: None keeps
    the tensors themselves (no copy); a directory keeps them in a ScratchFile there (see the module docstring),
    and `pop` returns the slot itself on CPU, or a copy on the compute device. Use as a context manager (or call
    close) so the file is unmapped on every exit path."""

    def __init__(self, like: torch.Tensor, n_layers: int, directory=None):
        self.n_layers, self.device = n_layers, like.device
        self.ram: list[torch.Tensor | None] | None = None
        self.file: ScratchFile | None = None
        self.popped: int | None = None
        if directory is None:
            self.ram = [None] * n_layers
            return
        self.shape, self.dtype = tuple(like.shape), like.dtype
        self.slot_bytes = like.numel() * like.element_size()
        self.stride = page_align(self.slot_bytes)  # page-aligned slots: msync and madvise take page offsets
        self.file = ScratchFile(directory, self.stride * n_layers)
        log.debug("activation checkpoints: %d slots of %d bytes in a scratch file in %s", n_layers,
                  self.slot_bytes, self.file.directory)

    def put(self, i: int, x: torch.Tensor) -> None:
        if self.ram is not None:
            self.ram[i] = x
            return
        self.file.tensor(i * self.stride, self.shape, self.dtype).copy_(x)
        self.file.write_back(i * self.stride, self.slot_bytes)
        self.file.drop(i * self.stride, self.slot_bytes)

    def pop(self, i: int) -> torch.Tensor:
        """Layer i's checkpoint, no longer held here. The slot popped before is dropped from the process now (its
        reader has finished with it)."""
        if self.ram is not None:
            x, self.ram[i] = self.ram[i], None
            return x
        self.release_popped()
        self.popped = i
        x = self.file.tensor(i * self.stride, self.shape, self.dtype)
        return x if self.device.type == "cpu" else x.to(self.device)

    def release_popped(self) -> None:
        if self.popped is not None and self.file is not None and self.file.map is not None:
            self.file.drop(self.popped * self.stride, self.slot_bytes)
        self.popped = None

    def close(self) -> None:
        self.ram = None
        if self.file is not None:
            self.release_popped()
            self.file.close()

    def __enter__(self) -> LayerCheckpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
