"""A GGUF file's header, read once with every count, length and extent checked against the file's size.

    header = GGUFHeader(path)       MespError naming the file and the fault for a truncated or lying header
    header.fields[key].contents()   a metadata value (scalars and strings read with the header; arrays on demand)
    header.tensors                  name, shape (fastest-first), type, absolute data offset, `data` (mapped)

It replaces the gguf package's GGUFReader for reading: that reader builds a numpy view per item of every array,
so a tokenizer's vocabulary (262k strings for Gemma 3) costs hundreds of MiB of private memory for a moment,
more than the training that follows. Here an array is only located while the header is walked, and read when
asked for: loading a model reads its sizes and tensor table, never its vocabulary. The attribute names follow
GGUFReader's (fields, tensors, types, contents(), tensor_type, data_offset, data) so callers read either.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import gguf
import numpy as np

from ..errors import MespError
from ..fileio import open_for_reading

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # 64-bit counts and lengths (what the gguf package reads)
GGML_MAX_DIMS = 4
# smallest possible encodings, to bound counts by the bytes left: a key/value is a key length (8), a value
# type (4) and a value of at least 1 byte; a tensor info a name length (8), a dim count (4), one dim (8), a
# type (4) and an offset (8)
MIN_KV_BYTES, MIN_TENSOR_INFO_BYTES = 13, 32
T = gguf.GGUFValueType
SCALAR_FORMATS = {T.UINT8: "<B", T.INT8: "<b", T.BOOL: "<?", T.UINT16: "<H", T.INT16: "<h", T.UINT32: "<I",
                  T.INT32: "<i", T.FLOAT32: "<f", T.UINT64: "<Q", T.INT64: "<q", T.FLOAT64: "<d"}
SCALAR_SIZES = {t: struct.calcsize(f) for t, f in SCALAR_FORMATS.items()}
NUMPY_ITEM_TYPES = {T.UINT8: np.uint8, T.INT8: np.int8, T.BOOL: np.bool_, T.UINT16: np.uint16, T.INT16: np.int16,
                    T.UINT32: np.uint32, T.INT32: np.int32, T.FLOAT32: np.float32, T.UINT64: np.uint64,
                    T.INT64: np.int64, T.FLOAT64: np.float64}
# tensor types the gguf package (and so mesp's decoders) sees as numbers; every other type as raw block bytes
NATIVE_TENSOR_TYPES = {gguf.GGMLQuantizationType.F16: np.float16, gguf.GGMLQuantizationType.F32: np.float32,
                       gguf.GGMLQuantizationType.F64: np.float64, gguf.GGMLQuantizationType.I8: np.int8,
                       gguf.GGMLQuantizationType.I16: np.int16, gguf.GGMLQuantizationType.I32: np.int32,
                       gguf.GGMLQuantizationType.I64: np.int64}


class HeaderCursor:
    """Reads a GGUF header front to back with every length checked against the bytes the file has left, so
    nothing is read or allocated on a length's word alone."""

    def __init__(self, f, path, size: int, pos: int = 0):
        self.f, self.path, self.size, self.pos = f, path, size, pos

    def fail(self, what: str):
        raise MespError(f"{self.path}: unreadable GGUF file: {what} (file of {self.size} bytes)")

    def take(self, n: int, what: str) -> bytes:
        if n > self.size - self.pos:
            self.fail(f"{what} at byte {self.pos} needs {n} bytes, past the end of the file")
        data = self.f.read(n)
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            self.fail(f"{what} at byte {self.pos} needs {n} bytes, past the end of the file")
        self.f.seek(n, 1)
        self.pos += n

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def string(self, what: str, keep: bool = True) -> str | None:
        n = self.u64(f"{what} length")
        if not keep:
            self.skip(n, what)
            return None
        return self.take(n, what).decode("utf-8", errors="replace")

    def array_head(self, what: str) -> tuple[int, int]:
        """An array's item type and count, the count bounded by the bytes left."""
        item, count = self.u32(f"{what} item type"), self.u64(f"{what} count")
        least = SCALAR_SIZES.get(item, 8)  # every string or array item takes at least 8 bytes
        if count > (self.size - self.pos) // least:
            self.fail(f"{what} claims {count} items, more than the file can hold")
        return item, count

    def value(self, vtype: int, what: str, keep: bool, depth: int = 0):
        """One value of type `vtype`: returned when `keep` (arrays as lists), else skipped."""
        if vtype in SCALAR_FORMATS:
            raw = self.take(SCALAR_SIZES[vtype], what)
            return struct.unpack(SCALAR_FORMATS[vtype], raw)[0] if keep else None
        if vtype == T.STRING:
            return self.string(what, keep)
        if vtype == T.ARRAY and depth < 2:
            item, count = self.array_head(what)
            return self.items(item, count, what, keep, depth)
        self.fail(f"{what} has unknown value type {vtype}")

    def items(self, item: int, count: int, what: str, keep: bool, depth: int = 0):
        """An array's `count` items of type `item` (after array_head): a list when `keep`, else skipped."""
        if item in SCALAR_SIZES:
            nbytes = count * SCALAR_SIZES[item]
            if keep:
                return np.frombuffer(self.take(nbytes, what), dtype=NUMPY_ITEM_TYPES[item]).tolist()
            self.skip(nbytes, f"{what} ({count} items)")
            return None
        if keep:
            return [self.value(item, what, True, depth + 1) for _ in range(count)]
        for _ in range(count):
            self.value(item, what, False, depth + 1)
        return None


class HeaderField:
    """One metadata key/value. Scalars and strings hold their value; an array holds where it lies in the file
    and is read by contents()."""

    def __init__(self, header: GGUFHeader, name: str, types: list, offset: int, value=None, count: int = 1):
        self.header, self.name, self.types, self.offset, self.value, self.count = \
            header, name, types, offset, value, count

    def contents(self):
        if self.types[0] != T.ARRAY:
            return self.value
        f, size = open_for_reading(self.header.path)
        with f:
            f.seek(self.offset)
            return HeaderCursor(f, self.header.path, size, self.offset).value(T.ARRAY, self.name, keep=True)


class HeaderTensor:
    """One tensor's info; `data` maps it from the file (as GGUFReader gives it: numbers in the file's dim order
    for float and integer types, raw block bytes [..., row bytes] for block types)."""

    def __init__(self, header: GGUFHeader, name: str, dims: list[int], kind: int, data_offset: int):
        self.header, self.name = header, name
        self.shape = np.array(dims, dtype=np.uint64)  # fastest-first, as GGUF lists them
        self.tensor_type = gguf.GGMLQuantizationType(kind)
        block, type_bytes = gguf.GGML_QUANT_SIZES[self.tensor_type]
        self.n_elements = math.prod(dims)
        self.n_bytes = self.n_elements // block * type_bytes
        self.data_offset = data_offset

    @property
    def data(self) -> np.ndarray:
        dims = tuple(int(n) for n in reversed(self.shape.tolist()))
        native = NATIVE_TENSOR_TYPES.get(self.tensor_type)
        if native is not None:
            return self.header.view(self.data_offset, native, self.n_elements).reshape(dims)
        block, type_bytes = gguf.GGML_QUANT_SIZES[self.tensor_type]
        dims = (*dims[:-1], dims[-1] // block * type_bytes)
        return self.header.view(self.data_offset, np.uint8, self.n_bytes).reshape(dims)


class GGUFHeader:
    """A GGUF file's metadata and tensor table (see the module docstring). MespError naming the file when it is
    not GGUF or any count, length, type or extent in its header does not fit the file: magic and version; tensor
    and key/value counts within what the remaining bytes could hold; every string, array and tensor info inside
    the file; every tensor's type known, its dims sane, its name unique and its data inside the file."""

    def __init__(self, path):
        self.path = Path(path)
        self.fields: dict[str, HeaderField] = {}
        self.tensors: list[HeaderTensor] = []
        self._map = None
        f, size = open_for_reading(self.path)
        with f:
            self._walk(HeaderCursor(f, self.path, size), size)

    def _walk(self, c: HeaderCursor, size: int) -> None:
        magic = c.take(4, "magic")
        if magic != GGUF_MAGIC:
            raise MespError(f"{self.path}: unreadable GGUF file: not GGUF (magic {magic!r})")
        version = c.u32("version")
        if version not in GGUF_VERSIONS:
            c.fail(f"unsupported version {version}")
        n_tensors, n_kv = c.u64("tensor count"), c.u64("key/value count")
        left = size - c.pos
        if n_kv > left // MIN_KV_BYTES or n_tensors > left // MIN_TENSOR_INFO_BYTES or \
                n_kv * MIN_KV_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES > left:
            c.fail(f"{n_tensors} tensors and {n_kv} key/values cannot fit in the {left} bytes after the header")
        for i in range(n_kv):
            key = c.string(f"key {i}")
            vtype = c.u32(f"type of {key!r}")
            offset, types = c.pos, [vtype]
            if vtype == T.ARRAY:
                item, count = c.array_head(f"value of {key!r}")
                types.append(item)
                c.items(item, count, f"value of {key!r}", keep=False)
                self.fields[key] = HeaderField(self, key, types, offset, count=count)
            else:
                self.fields[key] = HeaderField(self, key, types, offset, c.value(vtype, f"value of {key!r}", True))
        alignment = self.metadata("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            c.fail(f"general.alignment {alignment} is not a power of two")
        infos = []
        for i in range(n_tensors):
            name = c.string(f"tensor {i} name")
            n_dims = c.u32(f"tensor {name!r} dim count")
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                c.fail(f"tensor {name!r} has {n_dims} dims")
            dims = [c.u64(f"tensor {name!r} dims") for _ in range(n_dims)]
            infos.append((name, dims, c.u32(f"tensor {name!r} type"), c.u64(f"tensor {name!r} offset")))
        self.data_start = -(-c.pos // alignment) * alignment
        names = set()
        for name, dims, kind, offset in infos:
            try:
                block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                c.fail(f"tensor {name!r} has unknown type {kind}")
            if dims[0] % block:
                c.fail(f"tensor {name!r} rows of {dims[0]} are not whole blocks of {block}")
            if name in names:
                c.fail(f"tensor {name!r} appears twice")
            names.add(name)
            t = HeaderTensor(self, name, dims, kind, self.data_start + offset)
            if t.data_offset + t.n_bytes > size:
                c.fail(f"tensor {name!r} data [{t.data_offset}, {t.data_offset + t.n_bytes}) "
                       f"extends past the end of the file")
            self.tensors.append(t)

    def metadata(self, key: str, default=None):
        """The value of metadata `key`, or `default` when the file lacks it."""
        f = self.fields.get(key)
        return default if f is None else f.contents()

    def view(self, offset: int, dtype, count: int) -> np.ndarray:
        """`count` items of `dtype` at byte `offset`, read-only from the file's map (clean file-backed pages)."""
        if self._map is None:
            self._map = np.memmap(self.path, mode="r")
        return self._map[offset:offset + count * np.dtype(dtype).itemsize].view(dtype)
