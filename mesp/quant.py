"""Quantized frozen base weights: the weight types, not the policy of which weight gets which form.

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
- BlockWeight: a file format's own blocks kept as they are (raw bytes [out, row bytes]) and decoded by the
  format's decoder a block of rows at each use: the resident form of block types with no exact int4 / int8 form
  (GGUF K-quants, Q5_0 / Q5_1), as compact in memory as in the file.

FrozenWeight is the base of every non-tensor weight, including mesp.formats.safetensors.LazyWeight (a matrix
left in its file). Which form a weight takes is mesp.loaders' decision; decoding a file's blocks into these
types is its format module's (mesp.formats.gguf).

Computation: PyTorch's CPU kernels (torch._weight_int8pack_mm, torch._weight_int4pack_mm_for_cpu) are used
for bf16 activations on CPU, the only case where they beat dequantize + matmul (in fp32 they are far slower
than a plain fp32 product). PyTorch offers these kernels and their packing only as underscore ops: there is
no public API. Everything else, including every transposed product g W (no kernel exists for it),
dequantizes one block of rows at a time (at most CHUNK_ELEMENTS values) and frees it before the next: no
dequantized copy outlives the call (bf16 products run in fp32 on CPUs without native bf16 math, see
_matmul_dtype). Gradients are therefore exact with respect to the quantized model: x W^T and g W use the
same W.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F

from .cpu import native_bf16
from .errors import MespError
from .ops import acc_dtype

INT4_GROUP_SIZE = 64  # the paper's 4-bit setting (group 64)
CHUNK_ELEMENTS = 1 << 23  # most weight values dequantized at once (32 MiB in fp32)
QUANT_BLOCK_ELEMENTS = 1 << 22  # most source values converted to fp32 at once while quantizing (16 MiB)
KERNEL_DTYPES = (torch.bfloat16,)  # activations for which the CPU int4/int8 kernels beat dequantize + matmul


def _use_kernel(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in KERNEL_DTYPES


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a dequantized product runs in: fp32 for bf16/fp16 activations on a CPU without native bf16
    math, where a bf16 GEMM is several times slower than fp32; x's dtype otherwise. Results are cast back to
    x's dtype."""
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and not native_bf16():
        return torch.float32
    return x.dtype


def contiguous_range(ids: torch.Tensor) -> tuple[int, int] | None:
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
    chunk_elements = CHUNK_ELEMENTS  # most values a product dequantizes at once

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

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (any shape) in self.dtype, [*ids.shape, in]: a contiguous range through dense_rows, anything
        else by decoding each distinct row once (selected_rows) and gathering."""
        r = contiguous_range(ids)
        if r is not None:
            return self.dense_rows(r[0], r[1], self.dtype)
        uniq, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        dense = self.selected_rows(uniq)
        return dense[inverse.to(dense.device)].view(*ids.shape, self.shape[1])

    def selected_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows `idx` (sorted, distinct) in self.dtype: what rows() gathers from."""
        raise NotImplementedError

    def row_blocks(self):
        """(n0, n1) blocks of rows holding at most chunk_elements values (aligned to row_align)."""
        N, K = self.shape
        step = max(self.row_align, self.chunk_elements // max(K, 1) // self.row_align * self.row_align)
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


def quant_blocks(N: int, K: int, align: int) -> list[tuple[int, int]]:
    """Row blocks for quantizing or copying a row source. Multiples of 16 rows also keep a seeded random source's numbers the same as
    one draw of the whole matrix (see mesp.random_init.RandomMatrix)."""
    step = max(align, QUANT_BLOCK_ELEMENTS // max(K, 1) // align * align)
    return [(n0, min(N, n0 + step)) for n0 in range(0, N, step)]


# ---- the dequantization formulas (one place: resident and streamed weights both call these) ---------------

def int8_dense(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W = q * scale: q int8 [r, K], scale [r, K / block] -> [r, K] in dtype (computed in acc_dtype(dtype))."""
    acc = acc_dtype(dtype)
    r = q.shape[0]
    block = q.shape[1] // scale.shape[1]
    w = q.to(acc).view(r, -1, block).mul_(scale.to(acc)[:, :, None]).view(r, -1)
    return w.to(dtype)


def int4_dense(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W = (q - 8) * scale + zero: codes [r, K] in 0..15, scale and zero [r, K / group] -> [r, K] in dtype."""
    acc = acc_dtype(dtype)
    r = codes.shape[0]
    w = codes.to(acc).sub_(8.0).view(r, scale.shape[1], -1)
    w.mul_(scale.to(acc)[..., None]).add_(zero.to(acc)[..., None])
    return w.view(r, -1).to(dtype)


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
        for n0, n1 in quant_blocks(N, K, 16):
            w = _read_rows(source, n0, n1).to(torch.float32, copy=True)
            s = w.abs().amax(dim=1, keepdim=True).div_(127.0)
            q[n0:n1] = w.div_(torch.where(s > 0, s, 1.0)).round_().clamp_(-127, 127).to(torch.int8)
            scale[n0:n1] = s
            del w
        return cls(q, scale, dtype)

    def dense_rows(self, n0, n1, dtype):
        return int8_dense(self.q[n0:n1], self.scale[n0:n1], dtype)

    def rows(self, ids):
        r = contiguous_range(ids)
        if r is not None:
            return self.dense_rows(r[0], r[1], self.dtype)
        return self.gathered_rows(ids)

    def gathered_rows(self, ids):
        """Rows `ids` (any shape) by gathering their codes and scales: no look at the ids' values."""
        flat = ids.reshape(-1)
        return int8_dense(self.q[flat], self.scale[flat], self.dtype).view(*ids.shape, self.shape[1])

    def linear(self, x):
        if self.block == self.shape[1] and _use_kernel(x):
            y = torch._weight_int8pack_mm(x.reshape(-1, self.shape[1]).contiguous(), self.q,
                                          self.scale[:, 0].to(x.dtype))
            return y.view(*x.shape[:-1], self.shape[0])
        return super().linear(x)


# ---- a file format's own blocks --------------------------------------------------------------------------

class BlockWeight(FrozenWeight):
    """W's rows as a file format stores them: raw uint8 [out, row_bytes], decode(raw rows, dtype) -> dense rows
    (the same decoder a streamed weight of that format uses, so both compute the same W)."""

    _storage = ("raw",)

    def __init__(self, raw: torch.Tensor, shape, decode, dtype: torch.dtype = torch.float32):
        super().__init__(shape, dtype)
        self.raw, self.decode = raw, decode

    def dense_rows(self, n0, n1, dtype):
        return self.decode(self.raw[n0:n1], dtype)

    def selected_rows(self, idx):
        return self.decode(self.raw[idx], self.dtype)


# ---- int4 -----------------------------------------------------------------------------------------------

@functools.cache
def int4_layout() -> tuple[int, slice, slice]:
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
    if not torch.equal(unpack_int4(packed, probe.shape, 0, probe.shape[0], layout).int(), probe):
        raise RuntimeError("unrecognised int4 packing layout of torch._convert_weight_to_int4pack_for_cpu")
    return layout


def _as_slice(rows: torch.Tensor) -> slice:
    """An arithmetic row sequence as a slice, so unpacking writes through strided views; every layout PyTorch
    has is one (AVX2: 0..15 / 16..31, AVX512: 0..31 / 32..63, plain: evens / odds)."""
    start, step = int(rows[0]), int(rows[1] - rows[0]) if rows.numel() > 1 else 1
    if step <= 0 or not torch.equal(rows, torch.arange(start, start + step * rows.numel(), step)):
        raise RuntimeError("unrecognised int4 packing layout of torch._convert_weight_to_int4pack_for_cpu")
    return slice(start, start + step * rows.numel(), step)


def unpack_int4(packed: torch.Tensor, shape, n0: int, n1: int, layout=None) -> torch.Tensor:
    """uint8 codes [n1 - n0, K] of rows [n0, n1) of a kernel-packed [N, K] matrix."""
    B, lo, hi = layout or int4_layout()
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
        self.row_align = int4_layout()[0]

    @classmethod
    def pack(cls, block_codes, shape, group: int, dtype: torch.dtype = torch.float32) -> "Int4Weight":
        """Build an [N, K] weight block of rows by block: block_codes(n0, n1) gives rows [n0, n1) as (codes
        [n1-n0, K] in 0..15 (any integer dtype), scale [n1-n0, K/group], zero [n1-n0, K/group]). Blocks start on multiples of
        the layout's B rows (the kernel packs per block of B rows) and hold at most QUANT_BLOCK_ELEMENTS
        values, so no full-size intermediate of the matrix exists."""
        N, K = shape
        packed = torch.empty(N, K // 2, dtype=torch.uint8)
        flat = packed.view(-1)
        scale_zero = torch.empty(K // group, N, 2, dtype=torch.float32)
        for n0, n1 in quant_blocks(N, K, int4_layout()[0]):
            codes, scale, zero = block_codes(n0, n1)
            flat[n0 * K // 2: n1 * K // 2] = torch._convert_weight_to_int4pack_for_cpu(
                codes.to(torch.int32), 1).reshape(-1)
            scale_zero[:, n0:n1, 0] = scale.t()
            scale_zero[:, n0:n1, 1] = zero.t()
            del codes
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

        def block_codes(n0, n1):
            w = _read_rows(source, n0, n1).to(torch.float32, copy=True).reshape(n1 - n0, K // group, group)
            lo, hi = w.amin(dim=-1), w.amax(dim=-1)
            scale = (hi - lo).div_(15.0)
            inv = torch.where(scale > 0, 1.0 / scale, 0.0)
            codes = w.sub_(lo[..., None]).mul_(inv[..., None]).round_().clamp_(0, 15)
            return codes.to(torch.int32).view(n1 - n0, K), scale, lo.add_(scale, alpha=8.0)

        return cls.pack(block_codes, shape, group, dtype)

    def dense_rows(self, n0, n1, dtype):
        sz = self.scale_zero[:, n0:n1]  # [K/G, r, 2]
        return int4_dense(unpack_int4(self.packed, self.shape, n0, n1), sz[..., 0].t(), sz[..., 1].t(), dtype)

    def rows(self, ids):
        r = contiguous_range(ids)
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
