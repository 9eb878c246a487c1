"""Truncated or lying GGUF / safetensors headers: one-line errors naming the file and the fault, before anything
is mapped or allocated on the header's word (the absurd counts and lengths run under a 3 GiB address-space
limit, far below what honouring them would take)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import tracemalloc

import gguf
import numpy as np
import pytest
from test_loaders import run_cli_error

import mesp
from mesp.errors import MespError
from mesp.formats.gguf import check_gguf_header
from mesp.formats.gguf_header import GGUFHeader
from mesp.formats.safetensors import safetensors_header

T = gguf.GGUFValueType


def gguf_string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def gguf_file(kvs=(), tensors=(), n_tensors=None, n_kv=None, data=b"") -> bytes:
    """A GGUF file from raw parts: kvs = [(key, encoded typed value)], tensors = [(name, dims, type, offset)];
    counts as given (default: the real ones), the data section aligned to 32 bytes."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors,
                                len(kvs) if n_kv is None else n_kv)
    for key, value in kvs:
        out += gguf_string(key.encode()) + value
    for name, dims, kind, offset in tensors:
        out += gguf_string(name.encode()) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", kind, offset)
    return out + b"\0" * (-len(out) % 32) + data


ARCH = ("general.architecture", struct.pack("<I", T.STRING) + gguf_string(b"llama"))


@pytest.fixture
def tiny_gguf(make_hf_model, tmp_path):
    path, _ = make_hf_model("llama", num_key_value_heads=2)
    out = tmp_path / "tiny.gguf"
    mesp.quantize_model(path, "q8_0", out)
    return out


def test_truncated_gguf_is_one_line_at_every_cut(tiny_gguf, tmp_path, capsys):
    data = tiny_gguf.read_bytes()
    reader = gguf.GGUFReader(str(tiny_gguf))
    data_start = reader.data_offset
    for cut in (0, 3, 10, 20, 30, 200, data_start - 40, data_start - 1, data_start + 100, len(data) - 1):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        msg = run_cli_error(capsys, bad)
        assert f"cut{cut}.gguf" in msg and "unreadable GGUF file" in msg, (cut, msg)
    check_gguf_header(tiny_gguf)  # the whole file passes


def test_tensor_past_the_end_of_the_file(tmp_path, capsys):
    f32 = int(gguf.GGMLQuantizationType.F32)
    g = tmp_path / "past.gguf"
    g.write_bytes(gguf_file([ARCH], [("token_embd.weight", [8, 4], f32, 0)], data=b"\0" * 128))
    check_gguf_header(g)  # 8 x 4 floats: exactly the data there is
    g.write_bytes(gguf_file([ARCH], [("token_embd.weight", [8, 4], f32, 32)], data=b"\0" * 128))
    msg = run_cli_error(capsys, g)
    assert "'token_embd.weight'" in msg and "past the end of the file" in msg
    g.write_bytes(gguf_file([ARCH], [("token_embd.weight", [8, 1 << 40], f32, 0)], data=b"\0" * 128))
    assert "past the end of the file" in run_cli_error(capsys, g)
    q4 = int(gguf.GGMLQuantizationType.Q4_0)
    g.write_bytes(gguf_file([ARCH], [("token_embd.weight", [30, 4], q4, 0)], data=b"\0" * 128))
    assert "not whole blocks of 32" in run_cli_error(capsys, g)
    g.write_bytes(gguf_file([ARCH], [("token_embd.weight", [8, 4], 999, 0)], data=b"\0" * 128))
    assert "unknown type 999" in run_cli_error(capsys, g)
    g.write_bytes(gguf_file([ARCH], [("token_embd.weight", [8] * 5, f32, 0)], data=b"\0" * 128))
    assert "has 5 dims" in run_cli_error(capsys, g)


LYING = {  # name -> (file bytes, the message's telling part)
    "tensor_count": (gguf_file([ARCH], n_tensors=1 << 60), "cannot fit"),
    "kv_count": (gguf_file([ARCH], n_kv=1 << 62), "cannot fit"),
    "key_length": (gguf_file([("x", b"")], n_kv=1)[:24] + struct.pack("<Q", 1 << 61) + b"\0" * 64, "key 0"),
    "string_value": (gguf_file([("general.name", struct.pack("<IQ", T.STRING, 1 << 50))]), "general.name"),
    "array_count": (gguf_file([("tokenizer.ggml.tokens", struct.pack("<IIQ", T.ARRAY, T.STRING, 1 << 58))]),
                    "more than the file can hold"),
    "numeric_array": (gguf_file([("tokenizer.ggml.scores", struct.pack("<IIQ", T.ARRAY, T.FLOAT32, 1 << 58))]),
                      "more than the file can hold"),
}


@pytest.mark.parametrize("case", list(LYING))
def test_lying_gguf_counts_fail_in_place(tmp_path, case):
    data, expected = LYING[case]
    g = tmp_path / f"{case}.gguf"
    g.write_bytes(data)
    with pytest.raises(MespError, match=expected):
        check_gguf_header(g)


@pytest.mark.parametrize("case", ["tensor_count", "kv_count", "array_count"])
def test_absurd_gguf_counts_allocate_nothing(tmp_path, case):
    """Under a 3 GiB address-space limit the child ends with the one-line error, not MemoryError or a hang."""
    data, expected = LYING[case]
    g = tmp_path / f"{case}.gguf"
    g.write_bytes(data)
    assert_one_line_under_memory_limit(g, expected)


def assert_one_line_under_memory_limit(model, expected: str):
    child = ("import resource, sys; from mesp.cli import main; "
             "resource.setrlimit(resource.RLIMIT_AS, (3 << 30, resource.RLIM_INFINITY)); "
             f"sys.exit(main(['generate', '--model', {str(model)!r}, '--prompt', 'x']))")
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and expected in lines[0] and str(model) in lines[0], r.stderr


# ---- safetensors --------------------------------------------------------------------------------------

def rewrite_safetensors(tmp_path, make_hf_model, name, edit):
    """A copy of a tiny Qwen2 checkpoint whose safetensors header `edit(header dict)` changes (data kept)."""
    path, _ = make_hf_model("qwen2", num_key_value_heads=2)
    d = tmp_path / name
    shutil.copytree(path, d)
    f = d / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    data = edit(header, data) or data
    text = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return d


def _biggest(header):
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])


def test_safetensors_header_length_past_the_file(tmp_path, make_hf_model, capsys):
    d = rewrite_safetensors(tmp_path, make_hf_model, "len", lambda h, data: None)
    f = d / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    msg = run_cli_error(capsys, d)
    assert "model.safetensors" in msg and "header length" in msg
    f.write_bytes(struct.pack("<Q", 1 << 62) + raw[8:])
    assert_one_line_under_memory_limit(d, "header length")


def test_safetensors_extent_past_the_end(tmp_path, make_hf_model, capsys):
    def edit(h, data):
        last = _biggest(h)
        s, e = h[last]["data_offsets"]
        h[last]["data_offsets"] = [s + 64, e + 64]
    msg = run_cli_error(capsys, rewrite_safetensors(tmp_path, make_hf_model, "past", edit))
    assert "lies outside the file" in msg


def test_safetensors_overlapping_tensors(tmp_path, make_hf_model, capsys):
    def edit(h, data):
        names = sorted((k for k in h if k != "__metadata__" and len(h[k]["shape"]) == 1),
                       key=lambda k: h[k]["data_offsets"][0])
        a, b = names[0], names[1]  # two norms of the same size: b's range moved onto a's
        assert h[a]["shape"] == h[b]["shape"]
        h[b]["data_offsets"] = list(h[a]["data_offsets"])
    msg = run_cli_error(capsys, rewrite_safetensors(tmp_path, make_hf_model, "overlap", edit))
    assert "overlap" in msg


def test_safetensors_size_not_matching_shape(tmp_path, make_hf_model, capsys):
    def edit(h, data):
        last = _biggest(h)
        h[last]["shape"] = [h[last]["shape"][0] + 1, *h[last]["shape"][1:]]
    msg = run_cli_error(capsys, rewrite_safetensors(tmp_path, make_hf_model, "shape", edit))
    assert "bytes for shape" in msg

    def negative(h, data):
        h[_biggest(h)]["data_offsets"][0] = -4
    msg = run_cli_error(capsys, rewrite_safetensors(tmp_path, make_hf_model, "negative", negative))
    assert "malformed safetensors entry" in msg


def test_valid_headers_pass(make_hf_model, tiny_gguf):
    path, _ = make_hf_model("qwen2", num_key_value_heads=2)
    header = safetensors_header(path / "model.safetensors")
    assert "model.embed_tokens.weight" in header
    check_gguf_header(tiny_gguf)


def test_header_reads_what_the_gguf_package_reads(smollm2_gguf, tiny_gguf):
    """GGUFHeader against gguf.GGUFReader on the shipped model and a quantized tiny one: every metadata value
    (the vocabulary arrays included, read on demand) and every tensor's name, shape, type, offset and data."""
    for path in (smollm2_gguf, tiny_gguf):
        ours, ref = GGUFHeader(path), gguf.GGUFReader(str(path))
        assert list(ours.fields) == [k for k in ref.fields if not k.startswith("GGUF.")]
        for key, field in ours.fields.items():
            assert field.types == ref.fields[key].types, key
            assert field.contents() == ref.fields[key].contents(), key
        assert len(ours.tensors) == len(ref.tensors)
        for a, b in zip(ours.tensors, ref.tensors):
            assert (a.name, a.tensor_type, a.data_offset, a.n_bytes) == (b.name, b.tensor_type, b.data_offset, b.n_bytes)
            assert a.shape.tolist() == b.shape.tolist()
            assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
            assert np.array_equal(a.data, b.data)


def test_header_leaves_the_vocabulary_in_the_file(tmp_path):
    """A 200k-token vocabulary is located, not read, when the header is: the header's own allocations stay far
    below what reading the strings would take (the gguf package's reader builds a numpy view per string)."""
    n = 200_000
    tokens = struct.pack("<IIQ", T.ARRAY, T.STRING, n) + b"".join(gguf_string(b"tok%06d" % i) for i in range(n))
    g = tmp_path / "vocab.gguf"
    g.write_bytes(gguf_file([ARCH, ("tokenizer.ggml.tokens", tokens)]))
    tracemalloc.start()
    try:
        header = GGUFHeader(g)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert header.fields["tokenizer.ggml.tokens"].count == n
    assert peak < 1 << 20  # the 200k strings alone are several MiB as Python objects
    assert header.metadata("tokenizer.ggml.tokens")[n - 1] == "tok%06d" % (n - 1)
