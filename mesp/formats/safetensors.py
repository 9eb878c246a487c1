"""Safetensors: the header, lazy row reads, a Hugging Face directory's shards, and writing.

A .safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype code, shape,
[start, end) byte offsets into the data that follows; an optional "__metadata__" entry), then the raw
row-major tensor data. Reading the header alone is enough to read any rows of any tensor with positioned
reads, which is what LazyWeight does: nothing of the file is mapped or kept resident.
"""

from __future__ import annotations

import copy
import json
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import MespError, one_line
from ..fileio import atomic_write, open_for_reading, write_json
from ..quant import FrozenWeight

FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


# ---- reading --------------------------------------------------------------------------------------------

# bytes per element of every dtype code safetensors writes
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
               "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit on the JSON header


def safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """name -> (dtype code, shape, first byte, end byte) of every tensor in a .safetensors file.

    Everything is checked against the file before it is used: the header length within the file (and
    safetensors' own 100 MiB limit) before it is read, and every tensor's dtype known, shape a list of
    non-negative integers, byte range [start, end) inside the data, exactly shape x dtype bytes, and not
    overlapping another tensor's. A MespError names the file (and the tensor) at fault."""
    f, size = open_for_reading(path)
    with f:
        head = f.read(8)
        if len(head) != 8:
            raise MespError(f"{path}: unreadable safetensors file (truncated header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise MespError(f"{path}: unreadable safetensors file: header length {n} does not fit in the file "
                            f"of {size} bytes")
        try:
            meta = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MespError(f"{path}: unreadable safetensors header ({one_line(e)})") from e
    if not isinstance(meta, dict):
        raise MespError(f"{path}: unreadable safetensors file: header is not a JSON object")
    base = 8 + n
    out = {}
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            if not all(type(v) is int and v >= 0 for v in (*shape, start, end)):
                raise ValueError("shape and data_offsets must be non-negative integers")
        except (KeyError, TypeError, ValueError) as e:
            raise MespError(f"{path}: malformed safetensors entry for {name!r} ({one_line(e)})") from e
        if code not in DTYPE_BYTES:
            raise MespError(f"{path}: tensor {name!r} has unknown dtype {code!r}")
        if not start <= end <= size - base:
            raise MespError(f"{path}: tensor {name!r} data [{start}, {end}) lies outside the file's "
                            f"{size - base} data bytes")
        if end - start != math.prod(shape) * DTYPE_BYTES[code]:
            raise MespError(f"{path}: tensor {name!r} has {end - start} bytes for shape {tuple(shape)} {code}")
        out[name] = (code, tuple(shape), base + start, base + end)
    extents = sorted((s, e, name) for name, (_, _, s, e) in out.items() if e > s)
    for (_, e0, a), (s1, _, b) in zip(extents, extents[1:]):
        if s1 < e0:
            raise MespError(f"{path}: tensors {a!r} and {b!r} overlap in the file")
    return out


class LazyWeight(FrozenWeight):
    """A tensor left in its .safetensors file: every use reads the rows it needs (positioned reads into a
    fresh tensor, no memory map), converts them to the compute dtype, and drops them afterwards."""

    def __init__(self, path, name: str, stored: str, shape, start: int, end: int,
                 dtype: torch.dtype = torch.float32, device="cpu"):
        super().__init__(shape, dtype)
        if stored not in FLOAT_DTYPES:
            raise MespError(f"{path}: tensor {name!r} has non-float dtype {stored}")
        self.path, self.name, self.stored = str(path), name, FLOAT_DTYPES[stored]
        self.start, self._device = start, torch.device(device)
        self.row_bytes = (shape[1] if len(shape) > 1 else 1) * self.stored.itemsize
        if end - start != self.numel() * self.stored.itemsize:
            raise MespError(f"{path}: tensor {name!r} has {end - start} bytes for shape {tuple(shape)}")

    @property
    def device(self):
        return self._device

    @property
    def nbytes(self):
        return 0  # nothing stays resident

    def to(self, device=None, dtype=None):
        new = copy.copy(self)
        new._device = torch.device(device) if device is not None else self._device
        new.dtype = dtype or self.dtype
        return new

    def _read(self, f, n0: int, n1: int) -> torch.Tensor:
        buf = torch.empty((n1 - n0) * self.row_bytes, dtype=torch.uint8)
        f.seek(self.start + n0 * self.row_bytes)
        if f.readinto(buf.numpy()) != buf.numel():
            raise MespError(f"{self.path}: tensor {self.name!r} is truncated")
        return buf.view(self.stored).view(n1 - n0, *self.shape[1:])

    def read_rows(self, n0: int, n1: int) -> torch.Tensor:
        """Rows [n0, n1) as stored (dtype of the file), on CPU."""
        with open(self.path, "rb", buffering=0) as f:
            return self._read(f, n0, n1)

    def dense_rows(self, n0, n1, dtype):
        return self.read_rows(n0, n1).to(device=self._device, dtype=dtype)

    def selected_rows(self, idx):
        with open(self.path, "rb", buffering=0) as f:
            out = torch.cat([self._read(f, i, i + 1) for i in idx.tolist()])
        return out.to(device=self._device, dtype=self.dtype)


def lazy_safetensors(path: Path, dtype: torch.dtype, device) -> list[tuple[str, LazyWeight]]:
    """(name, LazyWeight) for every tensor of a .safetensors file, nothing read beyond its header."""
    return [(name, LazyWeight(path, name, code, shape, start, end, dtype, device))
            for name, (code, shape, start, end) in safetensors_header(path).items()]


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor, str]]:
    """(name, tensor, file) of every tensor of every file, each read whole as it comes."""
    for f in files:
        safetensors_header(f)  # extents checked against the file before the library maps it
        try:
            with safe_open(str(f), framework="pt") as st:
                keys = list(st.keys())
                for k in keys:
                    yield k, st.get_tensor(k), str(f)
        except MespError:
            raise
        except Exception as e:  # safetensors raises its own SafetensorError / OSError on a corrupt file
            raise MespError(f"{f}: unreadable safetensors file ({one_line(e)})") from e


# ---- a directory's shards -------------------------------------------------------------------------------

INDEX_FILE = "model.safetensors.index.json"  # transformers' shard index: {"weight_map": {name: file}}


def safetensors_files(directory: Path) -> list[Path]:
    """The model's .safetensors files: the shards the index names (in first-use order), else every
    *.safetensors file of the directory in name order."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise MespError(f"{index}: unreadable shard index ({one_line(e)})") from e
        files = [directory / n for n in names]
        for f in files:
            if not f.is_file():
                raise MespError(f"{index}: shard {f.name} does not exist")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise MespError(f"{directory}: no *.safetensors files")
    return files


# ---- writing --------------------------------------------------------------------------------------------

def write_safetensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (detached, contiguous, moved to CPU) atomically to `path`."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


class ShardWriter:
    """Writes tensors into numbered safetensors files of at most max_bytes each (a bigger tensor gets its own);
    finish() names them as transformers does, with an index when there are several (what safetensors_files
    reads back)."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[Path] = []
        self.weight_map: dict[str, int] = {}  # tensor name -> shard index
        self.total_bytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self.flush()
        self.pending[name] = t
        self.pending_bytes += nbytes
        self.total_bytes += nbytes
        self.weight_map[name] = len(self.files)

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.directory / f"shard-{len(self.files)}.safetensors"
        write_safetensors(path, self.pending, metadata={"format": "pt"})
        self.files.append(path)
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Give the shards their transformers names (+ index when several); returns the file names."""
        self.flush()
        n = len(self.files)
        if n == 1:
            names = ["model.safetensors"]
        else:
            names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for src, name in zip(self.files, names):
            os.replace(src, self.directory / name)
        if n > 1:
            write_json(self.directory / INDEX_FILE,
                       {"metadata": {"total_size": self.total_bytes},
                        "weight_map": {k: names[i] for k, i in self.weight_map.items()}})
        return names
