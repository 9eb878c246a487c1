"""GGUF's block types, decoded in torch, and the weight objects a GGUF matrix becomes (mesp.formats.gguf reads
the file and names the tensors; this module knows what a tensor's bytes mean).

    gguf_weight(tensor, perm, dtype)      a block-type matrix kept resident in its own quantization
    mapped_weight(mapped, tensor, perm, dtype)  any readable 2-D matrix left in the memory-mapped file
    BLOCK_DECODERS[qtype](blocks, dtype)  Q5 / K-quant blocks uint8 [rows, n, block bytes] -> [rows, n * values]

Q8_0 / Q4_0 / Q4_1 map exactly onto mesp.quant's Int8Weight / Int4Weight (q8_0_codes, q4_codes). The Q5 and
K-quant types, with w the decoded value of code q (all fp16 fields; llama.cpp's ggml-quants.c is the definition,
the gguf package's numpy decoders the reference they are tested against, bit for bit):
- Q5_0 (32 values, 22 bytes): d, 4 bytes of high bits, 16 bytes of low nibbles; w = d (q - 16).
- Q5_1 (32 values, 24 bytes): d, m, high bits, nibbles; w = d q + m.
- Q4_K (256 values, 144 bytes): d, dmin, 12 bytes of 6-bit (scale, min) pairs for 8 sub-blocks of 32, 128 bytes
  of nibbles; w = (d scale) q - (dmin min).
- Q5_K (256 values, 176 bytes): as Q4_K plus 32 bytes of high bits (bit i of byte j: value j of sub-block i).
- Q6_K (256 values, 210 bytes): 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales (one per 16
  values), then d; w = (d scale) (q - 32).

Every formula computes in fp32 in the reference's order of operations (so the result is bit for bit the gguf
package's), then casts to the asked dtype. These types stay in their own blocks in memory or in the mapped file
(mesp.quant.BlockWeight, mesp.streamed.MappedWeight) and are decoded a block of rows at each use: their
scale-of-scales structure has no exact form among mesp.quant's int4 / int8 weights.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

from ..quant import BlockWeight, Int4Weight, Int8Weight, int4_dense, int4_layout, int8_dense
from ..streamed import MappedFile, MappedWeight

Q = gguf.GGMLQuantizationType


def fp16_field(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 field at byte `at` of every block of uint8 blocks [rows, n, bytes], as fp32 [rows, n]."""
    return blocks[:, :, at:at + 2].contiguous().view(torch.float16)[..., 0].to(torch.float32)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [..., m] -> [..., 2, m]: the low nibbles of the m bytes, then their high nibbles."""
    return torch.stack([q & 15, q >> 4], dim=-2)


def _bits(q: torch.Tensor, width: int) -> torch.Tensor:
    """uint8 [..., m] -> [..., 8 / width, m]: the bytes' `width`-bit fields, lowest first."""
    mask = (1 << width) - 1
    return torch.stack([(q >> s) & mask for s in range(0, 8, width)], dim=-2)


def _q5_codes(blocks: torch.Tensor, head: int) -> torch.Tensor:
    """5-bit codes 0..31 of Q5_0 / Q5_1 blocks (the high bits' 4 bytes at `head`, then 16 bytes of nibbles) as
    fp32 [rows, n, 32]: value j's low nibble is byte j % 16's (low for j < 16), its fifth bit is bit j of the
    little-endian 32-bit high field."""
    r, n = blocks.shape[:2]
    low = _nibbles(blocks[:, :, head + 4:head + 20]).reshape(r, n, 32)
    high = _bits(blocks[:, :, head:head + 4], 1).transpose(-1, -2).reshape(r, n, 32)
    return (low | (high << 4)).to(torch.float32)


def q5_0_dense(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Q5_0 blocks uint8 [rows, n, 22] -> [rows, n * 32]: w = d (q - 16)."""
    r = blocks.shape[0]
    w = fp16_field(blocks, 0)[..., None] * _q5_codes(blocks, 2).sub_(16.0)
    return w.reshape(r, -1).to(dtype)


def q5_1_dense(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Q5_1 blocks uint8 [rows, n, 24] -> [rows, n * 32]: w = d q + m."""
    r = blocks.shape[0]
    w = (fp16_field(blocks, 0)[..., None] * _q5_codes(blocks, 4)).add_(fp16_field(blocks, 2)[..., None])
    return w.reshape(r, -1).to(dtype)


def k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K's 12 bytes of packed 6-bit (scale, min) of 8 sub-blocks, uint8 [rows, n, 12] -> (scale, min)
    fp32 [rows, n, 8]. Bytes 0-3 hold scales 0-3 (low 6 bits) and the top bits of scales 4-7, bytes 4-7 the
    same for mins, bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and of mins 4-7 (high nibble)."""
    d, m, md = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=-1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=-1)
    return sc.to(torch.float32), mn.to(torch.float32)


def _k_affine(blocks: torch.Tensor, q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w = (d scale) q - (dmin min) for Q4_K / Q5_K blocks and their codes q fp32 [rows, n, 8, 32]."""
    r = blocks.shape[0]
    sc, mn = k_scale_min(blocks[:, :, 4:16])
    d = (fp16_field(blocks, 0)[..., None] * sc)[..., None]
    dm = (fp16_field(blocks, 2)[..., None] * mn)[..., None]
    return (d * q).sub_(dm).reshape(r, -1).to(dtype)


def q4_k_dense(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Q4_K blocks uint8 [rows, n, 144] -> [rows, n * 256]. Sub-blocks 2j and 2j + 1 are the low and high
    nibbles of bytes 32j..32j + 31 of the codes."""
    r, n = blocks.shape[:2]
    q = _nibbles(blocks[:, :, 16:].reshape(r, n, 4, 32)).reshape(r, n, 8, 32)
    return _k_affine(blocks, q.to(torch.float32), dtype)


def q5_k_dense(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Q5_K blocks uint8 [rows, n, 176] -> [rows, n * 256]: Q4_K's nibbles (bytes 48..175) plus a fifth bit,
    bit i of byte j of bytes 16..47 for value j of sub-block i."""
    r, n = blocks.shape[:2]
    low = _nibbles(blocks[:, :, 48:].reshape(r, n, 4, 32)).reshape(r, n, 8, 32)
    high = _bits(blocks[:, :, 16:48], 1)
    return _k_affine(blocks, (low | (high << 4)).to(torch.float32), dtype)


def q6_k_dense(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Q6_K blocks uint8 [rows, n, 210] -> [rows, n * 256]: in each half of 128 values, the low nibbles of 64
    bytes then their high nibbles, the top two bits from 32 bytes (bits 0-1, 2-3, 4-5, 6-7 for the four runs of
    32); one int8 scale per 16 values, times d."""
    r, n = blocks.shape[:2]
    low = _nibbles(blocks[:, :, :128].reshape(r, n, 2, 64)).reshape(r, n, 8, 32)
    high = _bits(blocks[:, :, 128:192].reshape(r, n, 2, 32), 2).reshape(r, n, 8, 32)
    q = (low | (high << 4)).to(torch.float32).sub_(32.0).reshape(r, n, 16, 16)
    scales = blocks[:, :, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = fp16_field(blocks, 208)[..., None] * scales
    return (d[..., None] * q).reshape(r, -1).to(dtype)


BLOCK_DECODERS = {Q.Q5_0: q5_0_dense, Q.Q5_1: q5_1_dense, Q.Q4_K: q4_k_dense, Q.Q5_K: q5_k_dense,
                  Q.Q6_K: q6_k_dense}


# ---- weight objects -------------------------------------------------------------------------------------

def q8_0_codes(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 blocks uint8 [rows, in / 32, 34] (fp16 d, then 32 int8 codes; w = d q) -> (q int8 [rows, in],
    d fp32 [rows, in / 32]): Int8Weight's form (mesp.quant.int8_dense)."""
    rows = blocks.shape[0]
    return blocks[:, :, 2:].contiguous().view(torch.int8).reshape(rows, -1), fp16_field(blocks, 0)


def q4_codes(blocks: torch.Tensor, with_min: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 (fp16 d, 16 bytes; w = d (q - 8)) or Q4_1 (fp16 d, fp16 m, 16 bytes; w = d q + m) blocks, uint8
    [rows, in / 32, 18 or 20] -> (codes uint8 [rows, in] in 0..15, scale, zero fp32 [rows, in / 32]):
    Int4Weight's form (mesp.quant.int4_dense), zero = m + 8 d for Q4_1, 0 for Q4_0. Byte j of a block holds
    code j (low nibble) and code j + 16 (high nibble)."""
    rows = blocks.shape[0]
    head = 4 if with_min else 2
    q = blocks[:, :, head:]
    codes = torch.cat([q & 15, q >> 4], dim=-1).view(rows, -1)  # uint8: a quarter of int32's bytes per value
    d = fp16_field(blocks, 0)
    zero = fp16_field(blocks, 2) + 8.0 * d if with_min else torch.zeros_like(d)
    return codes, d, zero


def _blocks(raw, perm: torch.Tensor | None, block_bytes: int) -> torch.Tensor:
    """Raw rows (numpy uint8 [out, in / 32 * block_bytes]) as torch blocks [out, in / 32, block_bytes], rows
    reordered by `perm` (llama q/k un-permutation)."""
    raw = np.asarray(raw)
    if perm is not None:
        raw = raw[perm.numpy()]
    return torch.from_numpy(np.array(raw, dtype=np.uint8)).view(raw.shape[0], -1, block_bytes)


def q8_0_weight(raw: np.ndarray, perm: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> Int8Weight:
    """GGUF Q8_0 rows (raw uint8 [out, in / 32 * 34]) as a resident Int8Weight; `perm` reorders rows."""
    q, d = q8_0_codes(_blocks(raw, perm, 34))
    return Int8Weight(q, d, dtype)


def q4_weight(raw: np.ndarray, with_min: bool, perm: torch.Tensor | None = None,
              dtype: torch.dtype = torch.float32) -> Int4Weight:
    """GGUF Q4_0 / Q4_1 rows (raw uint8 [out, in / 32 * block bytes], out a multiple of 16) as a resident
    Int4Weight (see q4_codes); `perm` reorders rows."""
    blocks = _blocks(raw, perm, 20 if with_min else 18)
    N, K = blocks.shape[0], blocks.shape[1] * 32
    return Int4Weight.pack(lambda n0, n1: q4_codes(blocks[n0:n1], with_min), (N, K), 32, dtype)


def block_weight(raw: np.ndarray, qtype, perm: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32) -> BlockWeight:
    """GGUF rows of a Q5_0 / Q5_1 / K-quant type (raw uint8 [out, in / block * block bytes]) kept as they are,
    as a resident BlockWeight; `perm` reorders rows."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows = _blocks(raw, perm, size)
    return BlockWeight(rows.view(rows.shape[0], -1), (rows.shape[0], rows.shape[1] * block),
                       _row_decoder(qtype), dtype)


def gguf_weight(tensor, perm: torch.Tensor | None, dtype: torch.dtype):
    """A GGUF Q4_0 / Q4_1 / Q8_0 / Q5_0 / Q5_1 / Q4_K / Q5_K / Q6_K matrix kept in its own quantization (rows
    reordered by `perm` if given), or None for any other tensor type (and for 4-bit matrices whose rows are not
    a multiple of 16)."""
    Q = gguf.GGMLQuantizationType
    kind = tensor.tensor_type
    if len(tensor.shape) != 2 or kind not in (Q.Q4_0, Q.Q4_1, Q.Q8_0, *BLOCK_DECODERS):
        return None
    raw = np.asarray(tensor.data)
    if kind in BLOCK_DECODERS:
        return block_weight(raw, kind, perm, dtype)
    if kind == Q.Q8_0:
        return q8_0_weight(raw, perm, dtype)
    if raw.shape[0] % 16:
        return None
    return q4_weight(raw, kind == Q.Q4_1, perm, dtype)


# ---- streamed rows --------------------------------------------------------------------------------------

def _row_decoder(qtype):
    """decode(raw uint8 [rows, row bytes], dtype) -> dense rows, for the tensor types a streamed weight reads;
    None for any other. Q8_0 / Q4_0 / Q4_1 decode through Int8Weight's / Int4Weight's formulas, the other block
    types through mesp.formats.gguf_blocks.BLOCK_DECODERS."""
    Q = gguf.GGMLQuantizationType
    floats = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
    if qtype in floats:
        stored = floats[qtype]
        return lambda raw, dtype: raw.view(stored).to(dtype)
    if qtype == Q.Q8_0:
        return lambda raw, dtype: int8_dense(*q8_0_codes(raw.view(raw.shape[0], -1, 34)), dtype)
    if qtype in (Q.Q4_0, Q.Q4_1):
        with_min, size = qtype == Q.Q4_1, 20 if qtype == Q.Q4_1 else 18
        return lambda raw, dtype: int4_dense(*q4_codes(raw.view(raw.shape[0], -1, size), with_min), dtype)
    if qtype in BLOCK_DECODERS:
        decode, size = BLOCK_DECODERS[qtype], gguf.GGML_QUANT_SIZES[qtype][1]
        return lambda raw, dtype: decode(raw.view(raw.shape[0], -1, size), dtype)
    return None


def mapped_weight(mapped: MappedFile, tensor, perm: torch.Tensor | None, dtype: torch.dtype):
    """A 2-D F32 / F16 / BF16 / Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q4_K / Q5_K / Q6_K tensor left in the mapped file (mesp.streamed.MappedWeight,
    rows reordered by `perm`), or None for any other tensor."""
    decode = _row_decoder(tensor.tensor_type)
    if decode is None or len(tensor.shape) != 2:
        return None
    N, K = int(tensor.shape[1]), int(tensor.shape[0])  # GGUF lists dims fastest-first
    block, size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
    if K % block:
        return None
    Q = gguf.GGMLQuantizationType
    align = int4_layout()[0] if tensor.tensor_type in (Q.Q4_0, Q.Q4_1) and N % 16 == 0 else 1  # as Int4Weight
    return MappedWeight(mapped, int(tensor.data_offset), (N, K), K // block * size, decode, perm, dtype,
                        row_align=align)
