"""Frozen base weights that are not plain tensors: quantized in memory, or left on disk until used.

Every object here holds one [out, in] matrix W and implements the protocol mesp.ops and mesp.model use:

    w.linear(x)             x W^T                 x [..., in] -> [..., out], in x's dtype
    w.linear_grad_input(g)  g W                   g [..., out] -> [..., in], in g's dtype
    w.rows(ids)             W[ids] (embeddings)   in w.dtype, the model's compute dtype
    w.dequantize(dtype)     the whole W           (tests and exports; never on the training path)
    w.shape, w.dtype, w.device, w.numel(), w.nbytes (resident bytes), w.to(device)

Kinds:
- Int8Weight: symmetric int8 codes with one fp32 scale per block of `block` inputs of a row: per output
  channel (block = in, `quantize="int8"`) or GGUF Q8_0 (block 32). W = q * scale.
- Int4Weight: asymmetric 4-bit codes q in 0..15 per group of `group` inputs of a row (default 64, as in the
  paper), W = (q - 8) * scale + zero, fp32 scale and zero. That is the format of PyTorch's CPU kernel
  (torch._weight_int4pack_mm_for_cpu), so the codes are stored in that kernel's packed layout, and GGUF Q4_0
  (zero = 0) and Q4_1 (w = d q + m, so zero = m + 8 d) map onto it with group 32. Asymmetric (min/max) rather
  than symmetric because it uses all 16 levels on skewed groups and is what the kernel and Q4_1 compute.
- LazyWeight: a tensor left in its .safetensors file, read with positioned reads (no mmap, so nothing stays
  resident) each time it is used, in row blocks.

Computation: PyTorch's CPU kernels (torch._weight_int8pack_mm, torch._weight_int4pack_mm_for_cpu) are used
for bf16 activations on CPU, the only case where they are fast here (measured on this AVX2 machine for a
[256, 896] x [4864, 896] product: fp32 F.linear 150 ms; int4 kernel 7000 ms in fp32 but 50 ms in bf16, int8
kernel 3300 ms in fp32 but 34 ms in bf16). Everything else, including every transposed product g W (no
kernel exists for it), dequantizes one block of rows at a time (at most CHUNK_ELEMENTS values) and frees it
before the next: no dequantized copy outlives the call (bf16 products run in fp32 on CPUs without native bf16
math, see _matmul_dtype). Gradients are therefore exact with respect to the quantized model: x W^T and g W
use the same W.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import MespError
from .ops import acc_dtype

log = logging.getLogger(__name__)

MODES = ("int8", "int4", "gguf")
INT4_GROUP_SIZE = 64  # the paper's 4-bit setting (group 64)
CHUNK_ELEMENTS = 1 << 23  # most weight values dequantized at once (32 MiB in fp32)
QUANT_BLOCK_ELEMENTS = 1 << 22  # most source values converted to fp32 at once while quantizing (16 MiB)
KERNEL_DTYPES = (torch.bfloat16,)  # activations for which the CPU int4/int8 kernels beat dequantize + matmul


def _use_kernel(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in KERNEL_DTYPES


@functools.cache
def _cpu_has_bf16_math() -> bool:
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a dequantized product runs in: fp32 for bf16/fp16 activations on a CPU without native bf16
    math, where a bf16 GEMM is several times slower than fp32 (measured here, [1024, 896] x [896, 4864]:
    966 ms bf16, 149 ms fp32); x's dtype otherwise. Results are cast back to x's dtype."""
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and not _cpu_has_bf16_math():
        return torch.float32
    return x.dtype


def _contiguous_range(ids: torch.Tensor) -> tuple[int, int] | None:
    """(start, stop) when ids is exactly arange(start, stop), else None."""
    if ids.dim() != 1 or ids.numel() == 0:
        return None
    start, stop = int(ids[0]), int(ids[-1]) + 1
    if stop - start != ids.numel():
        return None
    if ids.numel() > 1 and not bool((ids[1:] - ids[:-1] == 1).all()):
        return None
    return start, stop


class FrozenWeight:
    """Common machinery: linear / linear_grad_input / rows over blocks of dequantized rows.

    A subclass implements `dense_rows(n0, n1, dtype)` (rows [n0, n1) of W as a new tensor) and
    `rows(ids)` (W[ids] in self.dtype, ids of any shape -> [*ids.shape, in]), lists its tensors in `_storage`,
    and may override `linear` with a kernel."""

    _storage: tuple[str, ...] = ()
    row_align = 1  # block boundaries must fall on multiples of this many rows

    def __init__(self, shape, dtype: torch.dtype):
        self.shape = torch.Size(shape)
        self.dtype = dtype  # what rows() and dequantize() return: the model's compute dtype

    # ---- sizes --------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return getattr(self, self._storage[0]).device

    @property
    def nbytes(self) -> int:
        """Bytes this weight keeps resident."""
        return sum(getattr(self, n).nbytes for n in self._storage)

    def numel(self) -> int:
        return self.shape.numel()

    def dim(self) -> int:
        return len(self.shape)

    def to(self, device=None, dtype: torch.dtype | None = None):
        """A copy on `device` (storage moved) whose compute dtype is `dtype` (default: unchanged)."""
        new = copy.copy(self)
        if device is not None:
            for name in self._storage:
                setattr(new, name, getattr(self, name).to(device))
        if dtype is not None:
            new.dtype = dtype
        return new

    def __repr__(self):
        return f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype}, {self.nbytes} bytes)"

    # ---- dense views --------------------------------------------------------------------------------
    def dense_rows(self, n0: int, n1: int, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.dense_rows(0, self.shape[0], dtype or self.dtype)

    def row_blocks(self):
        """(n0, n1) blocks of rows holding at most CHUNK_ELEMENTS values (aligned to row_align)."""
        N, K = self.shape
        step = max(self.row_align, CHUNK_ELEMENTS // max(K, 1) // self.row_align * self.row_align)
        return [(n0, min(N, n0 + step)) for n0 in range(0, N, step)]

    # ---- products -----------------------------------------------------------------------------------
    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T with W dequantized block by block (in _matmul_dtype(x))."""
        N, K = self.shape
        dt = _matmul_dtype(x)
        x2 = x.reshape(-1, K).to(dt)
        blocks = self.row_blocks()
        if len(blocks) == 1:
            y = F.linear(x2, self.dense_rows(0, N, dt))
        else:
            y = x2.new_empty(x2.shape[0], N)
            for n0, n1 in blocks:
                y[:, n0:n1] = F.linear(x2, self.dense_rows(n0, n1, dt))
        return y.to(x.dtype).view(*x.shape[:-1], N)

    def linear_grad_input(self, g: torch.Tensor) -> torch.Tensor:
        """g W, W dequantized block by block; blocks accumulate in at least fp32."""
        N, K = self.shape
        dt = _matmul_dtype(g)
        g2 = g.reshape(-1, N).to(dt)
        blocks = self.row_blocks()
        if len(blocks) == 1:
            gx = torch.matmul(g2, self.dense_rows(0, N, dt))
        else:
            acc = acc_dtype(dt)
            gx = torch.zeros(g2.shape[0], K, dtype=acc, device=g.device)
            for n0, n1 in blocks:
                gx.add_(torch.matmul(g2[:, n0:n1], self.dense_rows(n0, n1, dt)).to(acc))
        return gx.to(g.dtype).view(*g.shape[:-1], K)


# ---- source rows ----------------------------------------------------------------------------------------

def _read_rows(source, n0: int, n1: int) -> torch.Tensor:
    """Rows [n0, n1) of a tensor, or of a row source (an object with read_rows, asked in increasing order)."""
    if isinstance(source, torch.Tensor):
        return source[n0:n1]
    return source.read_rows(n0, n1)


def _quant_blocks(N: int, K: int, align: int) -> list[tuple[int, int]]:
    """Row blocks for quantizing. Multiples of 16 rows also keep a seeded random source's numbers the same as
    one draw of the whole matrix (see mesp.random_init.RandomMatrix)."""
    step = max(align, QUANT_BLOCK_ELEMENTS // max(K, 1) // align * align)
    return [(n0, min(N, n0 + step)) for n0 in range(0, N, step)]


# ---- int8 -----------------------------------------------------------------------------------------------

class Int8Weight(FrozenWeight):
    """W = q * scale with q int8 [out, in] and scale fp32 [out, in // block] (block = in: per channel)."""

    _storage = ("q", "scale")

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32):
        super().__init__(q.shape, dtype)
        self.q, self.scale = q, scale
        self.block = q.shape[1] // scale.shape[1]

    @classmethod
    def quantize(cls, source, shape, dtype: torch.dtype = torch.float32) -> "Int8Weight":
        """Symmetric per-output-channel int8 of a tensor or row source: scale = max|w_row| / 127."""
        N, K = shape
        q = torch.empty(N, K, dtype=torch.int8)
        scale = torch.empty(N, 1, dtype=torch.float32)
        for n0, n1 in _quant_blocks(N, K, 16):
            w = _read_rows(source, n0, n1).to(torch.float32, copy=True)
            s = w.abs().amax(dim=1, keepdim=True).div_(127.0)
            q[n0:n1] = w.div_(torch.where(s > 0, s, 1.0)).round_().clamp_(-127, 127).to(torch.int8)
            scale[n0:n1] = s
            del w
        return cls(q, scale, dtype)

    @classmethod
    def from_gguf_q8_0(cls, raw: np.ndarray, perm: torch.Tensor | None = None,
                       dtype: torch.dtype = torch.float32) -> "Int8Weight":
        """GGUF Q8_0 rows: raw uint8 [out, in / 32 * 34], each block an fp16 d then 32 int8 codes (w = d q).
        `perm` reorders rows (llama q/k un-permutation)."""
        N = raw.shape[0]
        blocks = np.ascontiguousarray(raw).reshape(N, -1, 34)
        if perm is not None:
            blocks = blocks[perm.numpy()]
        d = torch.from_numpy(blocks[:, :, :2].copy().view(np.float16)[..., 0].astype(np.float32))
        q = torch.from_numpy(blocks[:, :, 2:].copy().view(np.int8).reshape(N, -1))
        return cls(q, d, dtype)

    def _dense(self, q: torch.Tensor, scale: torch.Tensor, dtype) -> torch.Tensor:
        acc = acc_dtype(dtype)
        r = q.shape[0]
        w = q.to(acc).view(r, -1, self.block).mul_(scale.to(acc)[:, :, None]).view(r, -1)
        return w.to(dtype)

    def dense_rows(self, n0, n1, dtype):
        return self._dense(self.q[n0:n1], self.scale[n0:n1], dtype)

    def rows(self, ids):
        r = _contiguous_range(ids)
        if r is not None:
            return self.dense_rows(r[0], r[1], self.dtype)
        flat = ids.reshape(-1)
        return self._dense(self.q[flat], self.scale[flat], self.dtype).view(*ids.shape, self.shape[1])

    def linear(self, x):
        if self.block == self.shape[1] and _use_kernel(x):
            y = torch._weight_int8pack_mm(x.reshape(-1, self.shape[1]).contiguous(), self.q,
                                          self.scale[:, 0].to(x.dtype))
            return y.view(*x.shape[:-1], self.shape[0])
        return super().linear(x)


# ---- int4 -----------------------------------------------------------------------------------------------

@functools.cache
def _int4_layout() -> tuple[int, slice, slice]:
    """How torch._convert_weight_to_int4pack_for_cpu lays out codes on this machine: (B, lo, hi).

    Rows come in blocks of B (64 with AVX512, 32 otherwise); a full block of a [N, K] matrix is K groups of
    B/2 bytes, and byte j of group k holds rows lo[j] (low nibble) and hi[j] (high nibble) at column k. A last,
    shorter block pairs rows (2j, 2j+1). Found by packing a probe whose codes spell out row and column, then
    checked on random codes, so a different layout fails loudly rather than computing garbage."""
    N, K = 256, 2
    n = torch.arange(N, dtype=torch.int32)[:, None].expand(N, K)
    k = torch.arange(K, dtype=torch.int32)[None, :].expand(N, K)

    def nibbles(codes):
        p = torch._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1).reshape(-1)
        return torch.stack([p & 15, p >> 4], dim=-1).reshape(-1).long()  # (byte 0 low, byte 0 high, ...)

    row = nibbles(n % 16) + 16 * nibbles(n // 16)
    col = nibbles(k)
    B = int((col == 1).nonzero()[0])
    layout = (B, _as_slice(row[0:B:2]), _as_slice(row[1:B:2]))
    g = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 16, (2 * B + 16, 64), dtype=torch.int32, generator=g)
    packed = torch._convert_weight_to_int4pack_for_cpu(probe, 1)
    if not torch.equal(_unpack(packed, probe.shape, 0, probe.shape[0], layout).int(), probe):
        raise RuntimeError("unrecognised int4 packing layout of torch._convert_weight_to_int4pack_for_cpu")
    return layout


def _as_slice(rows: torch.Tensor) -> slice:
    """An arithmetic row sequence as a slice, so unpacking writes through strided views; every layout PyTorch
    has is one (AVX2: 0..15 / 16..31, AVX512: 0..31 / 32..63, plain: evens / odds)."""
    start, step = int(rows[0]), int(rows[1] - rows[0]) if rows.numel() > 1 else 1
    if step <= 0 or not torch.equal(rows, torch.arange(start, start + step * rows.numel(), step)):
        raise RuntimeError("unrecognised int4 packing layout of torch._convert_weight_to_int4pack_for_cpu")
    return slice(start, start + step * rows.numel(), step)


def _unpack(packed: torch.Tensor, shape, n0: int, n1: int, layout=None) -> torch.Tensor:
    """uint8 codes [n1 - n0, K] of rows [n0, n1) of a kernel-packed [N, K] matrix."""
    B, lo, hi = layout or _int4_layout()
    N, K = shape
    flat = packed.reshape(-1)
    full = N // B
    first = n0 // B
    parts = []
    last = min(full, -(-n1 // B))
    if last > first:
        blk = flat[first * B * K // 2: last * B * K // 2].view(last - first, K, B // 2)
        codes = torch.empty(last - first, B, K, dtype=torch.uint8, device=packed.device)
        # written straight into (transposed views of) the output: no temporaries
        torch.bitwise_and(blk, 15, out=codes[:, lo].transpose(1, 2))
        torch.bitwise_right_shift(blk, 4, out=codes[:, hi].transpose(1, 2))
        parts.append(codes.view(-1, K))
    if n1 > full * B:  # the short last block
        tail = flat[full * B * K // 2:].view(K, (N - full * B) // 2)
        codes = torch.empty(N - full * B, K, dtype=torch.uint8, device=packed.device)
        torch.bitwise_and(tail, 15, out=codes[0::2].t())
        torch.bitwise_right_shift(tail, 4, out=codes[1::2].t())
        parts.append(codes)
    codes = parts[0] if len(parts) == 1 else torch.cat(parts)
    start = min(first, full) * B
    return codes[n0 - start: n1 - start]


def int4_supported(shape, group_size: int = INT4_GROUP_SIZE) -> int | None:
    """The group size an [out, in] matrix gets (group_size, or the largest smaller kernel size dividing in),
    or None when the kernel cannot hold it (out not a multiple of 16, in not a multiple of 32)."""
    N, K = shape
    if N % 16:
        return None
    for g in (group_size, 128, 64, 32):
        if g <= group_size and K % g == 0:
            return g
    return None


class Int4Weight(FrozenWeight):
    """W = (q - 8) * scale + zero, q in 0..15 per group of `group` inputs; packed [out, in / 2] uint8 in the
    CPU kernel's layout, scale_zero fp32 [in / group, out, 2] (the kernel's qScaleAndZeros)."""

    _storage = ("packed", "scale_zero")

    def __init__(self, packed: torch.Tensor, scale_zero: torch.Tensor, shape, group: int,
                 dtype: torch.dtype = torch.float32):
        super().__init__(shape, dtype)
        self.packed, self.scale_zero, self.group = packed, scale_zero, group
        self.row_align = _int4_layout()[0]

    @classmethod
    def _pack(cls, codes_and_params, shape, group, dtype) -> "Int4Weight":
        """Build from an iterator of (n0, n1, codes int32 [n1-n0, K], scale [n1-n0, K/group], zero) blocks,
        each block starting on a multiple of the layout's B rows (packing is per block of B rows)."""
        N, K = shape
        packed = torch.empty(N, K // 2, dtype=torch.uint8)
        flat = packed.view(-1)
        scale_zero = torch.empty(K // group, N, 2, dtype=torch.float32)
        for n0, n1, codes, scale, zero in codes_and_params:
            flat[n0 * K // 2: n1 * K // 2] = torch._convert_weight_to_int4pack_for_cpu(codes, 1).reshape(-1)
            scale_zero[:, n0:n1, 0] = scale.t()
            scale_zero[:, n0:n1, 1] = zero.t()
        return cls(packed, scale_zero, shape, group, dtype)

    @classmethod
    def quantize(cls, source, shape, group_size: int = INT4_GROUP_SIZE,
                 dtype: torch.dtype = torch.float32) -> "Int4Weight":
        """Asymmetric group-wise int4 of a tensor or row source: per group, scale = (max - min) / 15,
        q = round((w - min) / scale), zero = min + 8 scale (so (q - 8) scale + zero = min + q scale)."""
        N, K = shape
        group = int4_supported(shape, group_size)
        if group is None:
            raise MespError(f"int4 needs out % 16 == 0 and in % 32 == 0, got shape {tuple(shape)}")

        def blocks():
            for n0, n1 in _quant_blocks(N, K, _int4_layout()[0]):
                w = _read_rows(source, n0, n1).to(torch.float32, copy=True).reshape(n1 - n0, K // group, group)
                lo, hi = w.amin(dim=-1), w.amax(dim=-1)
                scale = (hi - lo).div_(15.0)
                inv = torch.where(scale > 0, 1.0 / scale, 0.0)
                codes = w.sub_(lo[..., None]).mul_(inv[..., None]).round_().clamp_(0, 15)
                yield n0, n1, codes.to(torch.int32).view(n1 - n0, K), scale, lo.add_(scale, alpha=8.0)
                del w, codes

        return cls._pack(blocks(), shape, group, dtype)

    @classmethod
    def from_gguf(cls, raw: np.ndarray, with_min: bool, perm: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float32) -> "Int4Weight":
        """GGUF Q4_0 (with_min False: block = fp16 d, 16 bytes; w = d (q - 8)) or Q4_1 (fp16 d, fp16 m,
        16 bytes; w = d q + m) rows, raw uint8 [out, in / 32 * block bytes]; byte j of a block holds code j
        (low nibble) and code j + 16 (high nibble). `perm` reorders rows (llama q/k un-permutation)."""
        N = raw.shape[0]
        head = 4 if with_min else 2
        blocks = np.ascontiguousarray(raw).reshape(N, -1, head + 16)
        nb = blocks.shape[1]
        if perm is not None:
            blocks = blocks[perm.numpy()]
        d = torch.from_numpy(blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
        m = (torch.from_numpy(blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
             if with_min else torch.zeros_like(d))
        qs = torch.from_numpy(blocks[:, :, head:].copy())  # [N, nb, 16]
        K = nb * 32
        shape = (N, K)  # rows must be a multiple of 16 (gguf_weight checks)
        B = _int4_layout()[0]

        def parts():
            for n0, n1 in _quant_blocks(N, K, B):
                q = qs[n0:n1]
                codes = torch.cat([q & 15, q >> 4], dim=-1).to(torch.int32).view(n1 - n0, K)
                zero = m[n0:n1] + 8.0 * d[n0:n1] if with_min else torch.zeros_like(d[n0:n1])
                yield n0, n1, codes, d[n0:n1], zero

        return cls._pack(parts(), shape, 32, dtype)

    def dense_rows(self, n0, n1, dtype):
        acc = acc_dtype(dtype)
        r, G = n1 - n0, self.group
        codes = _unpack(self.packed, self.shape, n0, n1)
        sz = self.scale_zero[:, n0:n1].to(acc)  # [K/G, r, 2]
        w = codes.to(acc).sub_(8.0).view(r, -1, G)
        w.mul_(sz[..., 0].t()[..., None]).add_(sz[..., 1].t()[..., None])
        return w.view(r, -1).to(dtype)

    def rows(self, ids):
        r = _contiguous_range(ids)
        if r is not None:
            return self.dense_rows(r[0], r[1], self.dtype)
        # unpack only the blocks of B rows that hold the ids (the packed layout interleaves rows per block)
        flat = ids.reshape(-1)
        N, B = self.shape[0], self.row_align
        blocks, inverse = torch.unique(torch.div(flat, B, rounding_mode="floor"), return_inverse=True)
        spans = [(b * B, min(N, b * B + B)) for b in blocks.tolist()]
        dense = torch.cat([self.dense_rows(n0, n1, self.dtype) for n0, n1 in spans])
        starts = torch.tensor([0] + [n1 - n0 for n0, n1 in spans[:-1]], device=flat.device).cumsum(0)
        return dense[starts[inverse] + flat % B].view(*ids.shape, self.shape[1])

    def linear(self, x):
        if _use_kernel(x):
            N, K = self.shape
            y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, K).contiguous(), self.packed, self.group,
                                                  self.scale_zero.to(x.dtype))
            return y.view(*x.shape[:-1], N)
        return super().linear(x)


# ---- lazy (on disk) -------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """name -> (dtype code, shape, first byte, end byte) of every tensor in a .safetensors file."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise MespError(f"{path}: unreadable safetensors file (truncated header)")
        (n,) = struct.unpack("<Q", head)
        try:
            meta = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MespError(f"{path}: unreadable safetensors header ({e})") from e
    base = 8 + n
    out = {}
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            out[name] = (info["dtype"], tuple(int(s) for s in info["shape"]), base + int(start), base + int(end))
        except (KeyError, TypeError, ValueError) as e:
            raise MespError(f"{path}: malformed safetensors entry for {name!r}") from e
    return out


class LazyWeight(FrozenWeight):
    """A tensor left in its .safetensors file: every use reads the rows it needs (positioned reads into a
    fresh tensor, no memory map), converts them to the compute dtype, and drops them afterwards."""

    def __init__(self, path, name: str, stored: str, shape, start: int, end: int,
                 dtype: torch.dtype = torch.float32, device="cpu"):
        super().__init__(shape, dtype)
        if stored not in _SAFETENSORS_DTYPES:
            raise MespError(f"{path}: tensor {name!r} has non-float dtype {stored}")
        self.path, self.name, self.stored = str(path), name, _SAFETENSORS_DTYPES[stored]
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

    def rows(self, ids):
        r = _contiguous_range(ids)
        if r is not None:
            return self.dense_rows(r[0], r[1], self.dtype)
        flat = ids.reshape(-1)
        uniq, inverse = torch.unique(flat, return_inverse=True)
        with open(self.path, "rb", buffering=0) as f:
            out = torch.cat([self._read(f, i, i + 1) for i in uniq.tolist()])
        return out.to(device=self._device, dtype=self.dtype)[inverse.to(self._device)].view(*ids.shape, -1)


def lazy_safetensors(path: Path, dtype: torch.dtype, device) -> list[tuple[str, LazyWeight]]:
    """(name, LazyWeight) for every tensor of a .safetensors file, nothing read beyond its header."""
    return [(name, LazyWeight(path, name, code, shape, start, end, dtype, device))
            for name, (code, shape, start, end) in safetensors_header(path).items()]


# ---- choosing a form per weight -------------------------------------------------------------------------

def check_mode(quantize) -> str | None:
    """Normalise load_model's quantize= ("none" -> None); MespError on anything else unknown."""
    if quantize is None or quantize == "none":
        return None
    if quantize not in MODES:
        raise MespError(f"quantize: unknown {quantize!r}; choose from none, {', '.join(MODES)}")
    return quantize


def is_matrix(name: str, shape) -> bool:
    """Projections, the embedding table and the LM head: the base weights worth quantizing or leaving on disk."""
    return name.endswith(".weight") and len(shape) == 2


def place_weight(name: str, source, quantize: str | None, dtype: torch.dtype, device):
    """The form base weight `name` takes in the model.

    source: a tensor, a FrozenWeight (already quantized from a GGUF file, or lazy), or a row source (an object
    with shape and read_rows: seeded random rows, or a LazyWeight to quantize, read block by block without
    mapping the file). quantize "int8": every matrix int8 per channel;
    "int4": projections int4 (group INT4_GROUP_SIZE), embedding and LM head int8 per row (they are read as
    rows, are the most sensitive to quantization, and their int8 form keeps the fast bf16 kernel); "gguf" or
    None: tensors stay dense in `dtype`. Vectors (norms, biases) always stay dense."""
    if isinstance(source, LazyWeight) and not is_matrix(name, source.shape):
        return source.read_rows(0, source.shape[0]).to(device=device, dtype=dtype)
    if isinstance(source, FrozenWeight) and not (isinstance(source, LazyWeight) and quantize):
        return source.to(device, dtype)
    shape = tuple(source.shape)
    if quantize in ("int8", "int4") and is_matrix(name, shape):
        table = name in ("model.embed_tokens.weight", "lm_head.weight")
        if quantize == "int4" and not table:
            if int4_supported(shape) is not None:
                return Int4Weight.quantize(source, shape, dtype=dtype).to(device)
            log.warning("%s: shape %s does not fit the int4 kernel; stored as int8", name, shape)
        return Int8Weight.quantize(source, shape, dtype=dtype).to(device)
    dense = source if isinstance(source, torch.Tensor) else source.read_rows(0, shape[0])
    return dense.to(device=device, dtype=dtype).contiguous()


def gguf_weight(tensor, perm: torch.Tensor | None, dtype: torch.dtype):
    """A GGUF Q4_0 / Q4_1 / Q8_0 matrix kept in its own quantization (rows reordered by `perm` if given), or
    None for any other tensor type (and for 4-bit matrices whose rows are not a multiple of 16)."""
    import gguf

    kinds = {gguf.GGMLQuantizationType.Q4_0: "q4_0", gguf.GGMLQuantizationType.Q4_1: "q4_1",
             gguf.GGMLQuantizationType.Q8_0: "q8_0"}
    kind = kinds.get(tensor.tensor_type)
    if kind is None or len(tensor.shape) != 2:
        return None
    raw = np.asarray(tensor.data)
    if kind == "q8_0":
        return Int8Weight.from_gguf_q8_0(raw, perm, dtype)
    if raw.shape[0] % 16:
        return None
    return Int4Weight.from_gguf(raw, kind == "q4_1", perm, dtype)
