"""base.ptd, ExecuTorch's external weights file, written by mesp one weight at a time.

ExecuTorch's own path (to_executorch with external_constants, then write_tensor_data_to_file) copies every
constant's bytes into the emitter and again into the file's Cord: two copies of the weights in memory, 12 GB for
a 1.5B model in fp32. mesp traces the step with placeholder weights instead (mesp.loaders.load_placeholders)
and writes the file itself, in the same format, with the real weights read or drawn one at a time
(mesp.loaders.iter_weights): only the file's metadata and one weight are ever held.

The format is executorch's flat_tensor (.ptd), as executorch 1.5.1 writes it (extension/flat_tensor/serialize
and exir/_serialize): a 16-aligned header (magic FH01, flatbuffer offset and size, segment base offset, segment
data size) injected into a FlatTensor flatbuffer, padded to the segment alignment (ExecutorchBackendConfig's,
128); then the segments, each at a multiple of it from the base, zero-padded between. One segment per distinct
content (bytes that are equal share one, as ExecuTorch deduplicates them), in the order of the first key that
holds it; named_data lists every key in the emitter's order with its segment and tensor layout. The flatbuffer
is made by executorch's own private helpers of 1.5.1 (mesp checks the version): so the file mesp writes is,
byte for byte, the one ExecuTorch would write with the real weights (tests/test_executorch.py checks it).

Two passes over the weights (each one at a time): the first hashes them (which keys share a segment decides
every offset), the second writes each at its offset.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .errors import MespError
from .fileio import atomic_write

EXECUTORCH_VERSION = "1.5.1"  # the version whose private serialization helpers this module uses

WeightSource = Callable[[], Iterable[tuple[str, torch.Tensor]]]  # each call: (key, tensor) one at a time


@dataclass
class Entry:
    """One named tensor of the file: its key, layout (an executorch TensorLayout) and size; data, its bytes,
    where the program already has them (small constants), None where a WeightSource gives them."""
    key: str
    layout: object
    nbytes: int
    data: bytes | None


def check_version() -> None:
    import executorch.version

    found = executorch.version.__version__.split("+")[0]
    if found != EXECUTORCH_VERSION:
        raise MespError(f"executorch {found}: mesp writes .ptd files with the private helpers of executorch "
                        f"{EXECUTORCH_VERSION}; install that version (scripts/dev.sh runner)")


def external_entries(program, tag: str, from_source: set[str]) -> list[Entry]:
    """The entries of the .ptd file `tag` of an ExecutorchProgramManager, in the order ExecuTorch writes them;
    the keys in `from_source` without data (their bytes in the program are the placeholders')."""
    from executorch.exir._serialize._serialize import _extract_external_tensor_layouts

    check_version()
    output = program._emitter_output
    if program._named_data is not None and program._named_data.external_data:
        raise MespError("the program has delegate data for its external file; mesp writes emitter constants only")
    layouts = _extract_external_tensor_layouts(output.program)
    entries = []
    for key, index in output.external_constant_map.get(tag, {}).items():
        data = output.external_constant_buffer[index]
        entries.append(Entry(key, layouts[key], len(data), None if key in from_source else bytes(data)))
    missing = from_source - {e.key for e in entries}
    if missing:
        raise MespError(f"{sorted(missing)[0]}: not an external constant of the program ({len(missing)} such)")
    return entries


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of `t` as ExecuTorch stores a constant (its contiguous storage), without a copy."""
    return memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())


def source_digests(entries: list[Entry], weights: WeightSource, where: str) -> dict[str, bytes]:
    """sha256 of every entry's bytes (the source's read once, one at a time), checked against the layouts."""
    from executorch.exir.tensor import scalar_type_enum

    by_key = {e.key: e for e in entries}
    digests = {e.key: hashlib.sha256(e.data).digest() for e in entries if e.data is not None}
    for key, t in weights():
        entry = by_key.get(key)
        if entry is None or entry.data is not None:
            continue  # a weight the program does not read from this file (a tied head, say)
        if (list(t.shape) != list(entry.layout.sizes) or scalar_type_enum(t.dtype) != entry.layout.scalar_type
                or t.nbytes != entry.nbytes):
            raise MespError(f"{where}: {key} is {t.dtype} {tuple(t.shape)}; the program expects "
                            f"{entry.layout.scalar_type.name} {tuple(entry.layout.sizes)}")
        digests[key] = hashlib.sha256(tensor_bytes(t)).digest()
    missing = [e.key for e in entries if e.key not in digests]
    if missing:
        raise MespError(f"{where}: no weight {missing[0]!r} for the program ({len(missing)} missing)")
    return digests


def write_ptd(path, entries: list[Entry], weights: WeightSource, segment_alignment: int = 128) -> None:
    """Write the .ptd file of `entries` to `path` (atomically), the entries without data taken from `weights`
    (called twice; each call yields (key, tensor) one at a time, in any order)."""
    from executorch.exir._serialize._program import _insert_flatbuffer_header
    from executorch.exir._serialize.padding import aligned_size, pad_to
    from executorch.extension.flat_tensor.serialize.flat_tensor_schema import DataSegment, FlatTensor, NamedData
    from executorch.extension.flat_tensor.serialize.serialize import (_FLAT_TENSOR_VERSION, _FLATBUFFER_ALIGNMENT,
                                                                     FlatTensorHeader, _serialize_to_flatbuffer)

    check_version()
    digests = source_digests(entries, weights, str(path))
    segment_of: dict[bytes, int] = {}
    segments, named, first_key = [], [], {}  # first_key: key -> offset, for the key that writes its segment
    for e in entries:
        d = digests[e.key]
        if d not in segment_of:
            end = segments[-1].offset + segments[-1].size if segments else 0
            segment_of[d] = len(segments)
            segments.append(DataSegment(offset=aligned_size(end, segment_alignment), size=e.nbytes))
            first_key[e.key] = segments[-1].offset
        named.append(NamedData(key=e.key, segment_index=segment_of[d], tensor_layout=e.layout))
    data_size = segments[-1].offset + segments[-1].size if segments else 0
    flatbuffer = bytes(_serialize_to_flatbuffer(FlatTensor(version=_FLAT_TENSOR_VERSION, segments=segments,
                                                           named_data=named)))
    header_length = aligned_size(FlatTensorHeader.EXPECTED_LENGTH, _FLATBUFFER_ALIGNMENT)
    base = aligned_size(len(flatbuffer) + header_length, segment_alignment)
    header = pad_to(FlatTensorHeader(flatbuffer_offset=header_length, flatbuffer_size=len(flatbuffer),
                                     segment_base_offset=base, segment_data_size=data_size).to_bytes(),
                    header_length)
    head = pad_to(_insert_flatbuffer_header(flatbuffer_data=flatbuffer, magic_regex=r"FT[0-9a-zA-Z][0-9a-zA-Z]",
                                            header_data=header), base)

    def write(tmp):
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            os.ftruncate(fd, base + data_size)  # the padding between segments: zeros, as ExecuTorch writes
            write_all(fd, memoryview(head), 0)
            written = set()
            for e in entries:
                if e.key in first_key and e.data is not None:
                    write_all(fd, memoryview(e.data), base + first_key[e.key])
                    written.add(e.key)
            for key, t in weights():
                if key in first_key and key not in written:
                    write_all(fd, tensor_bytes(t), base + first_key[key])
                    written.add(key)
            if written != set(first_key):
                raise MespError(f"{path}: the weights changed between reading and writing "
                                f"({len(set(first_key) - written)} not given again)")
        finally:
            os.close(fd)

    atomic_write(path, write)


def write_all(fd: int, data: memoryview, offset: int) -> None:
    """os.pwrite until all of `data` is at `offset` (one call may write less, e.g. over 2 GiB)."""
    data = data.cast("B")
    while len(data):
        n = os.pwrite(fd, data[:1 << 30], offset)
        data, offset = data[n:], offset + n
