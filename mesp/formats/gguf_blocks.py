"""GGUF's Q5 and K-quant block layouts, decoded in torch: raw blocks of a matrix's rows -> dense rows.

    decode = BLOCK_DECODERS[qtype]        decode(blocks uint8 [rows, n, block bytes], dtype) -> [rows, n * values]

The types, with w the decoded value of code q (all fp16 fields; llama.cpp's ggml-quants.c is the definition, the
gguf package's numpy decoders the reference they are tested against, bit for bit):
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
import torch

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
