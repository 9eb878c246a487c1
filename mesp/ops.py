"""Forward/backward pairs for the ops of a decoder layer, llm.c style.

Every op's forward sits next to its hand-derived backward. The backward functions
use no autograd: they are called under ``torch.no_grad()`` by the MeSP layer code
and only ever see the tensors the caller chose to keep. Which of them a family's
layer uses is said in mesp.families (``NORMS``, ``ACTIVATIONS``). Attention and the LM head's cross-entropy,
which run block by block, are in mesp.blockwise.

Conventions
-----------
* Row-major linear algebra: ``y = x W^T``; W is ``[out, in]``.
* Reductions that are numerically delicate (RMSNorm variance, softmax statistics,
  log-sum-exp, cross-entropy) are accumulated in at least fp32 (``acc_dtype``:
  bf16/fp16 -> fp32, fp32 -> fp32, fp64 stays fp64 so that gradient checks in double
  are exact). Results come back in the input dtype.
* Frozen base weights are either a plain ``torch.Tensor [out, in]`` or an object with
  ``.linear(x) -> x @ W.T`` and ``.linear_grad_input(g) -> g @ W`` (quantized weights).
  Only :func:`frozen_linear` / :func:`frozen_linear_grad_input` look inside them.
* Backward functions run under ``torch.no_grad()`` (they use in-place ops autograd could not follow); the
  plain forwards (rmsnorm, rope, swiglu, geglu, lora_linear) stay
  differentiable for the autograd baselines and the tests.
* Large temporaries are ``del``-ed as soon as they are dead and in-place ops are used
  on tensors this module owns (never on the caller's inputs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "acc_dtype",
    "frozen_linear",
    "frozen_linear_grad_input",
    "rmsnorm_forward",
    "rmsnorm_backward",
    "rope_inv_freq",
    "rope_cos_sin",
    "rope_forward",
    "rope_backward",
    "rotate_half",
    "swiglu_forward",
    "swiglu_backward",
    "lora_linear_forward",
    "lora_linear_backward",
    "rmsnorm_offset_forward",
    "rmsnorm_offset_backward",
    "geglu_forward",
    "geglu_backward",
]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: at least fp32 (bf16/fp16 -> fp32), fp64 stays fp64."""
    return torch.promote_types(dtype, torch.float32)


# ----------------------------------------------------------------------------
# frozen linear (base weights, possibly quantized)


def frozen_linear(x, w, bias=None):
    """y = x W^T (+ bias).  x [..., in], W [out, in] (tensor or quantized object) -> [..., out].

    For a plain tensor whose dtype differs from x (e.g. fp32 weights, bf16 activations)
    x is cast to W's dtype for the matmul and the result cast back, so outputs always
    come back in x's dtype.
    """
    if isinstance(w, torch.Tensor):
        if w.dtype != x.dtype:
            b = None if bias is None else bias.to(w.dtype)
            return F.linear(x.to(w.dtype), w, b).to(x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    y = _FrozenWeightLinear.apply(x, w) if torch.is_grad_enabled() and x.requires_grad else w.linear(x)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


class _FrozenWeightLinear(torch.autograd.Function):
    """x W^T for a weight object under autograd: backward is w.linear_grad_input, so autograd never sees
    (or saves) a dequantized copy of W and needs no derivative for the quantized kernels."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.w = w
        return w.linear(x)

    @staticmethod
    def backward(ctx, g):
        return ctx.w.linear_grad_input(g), None


def frozen_linear_grad_input(g, w):
    """gx = g W.  g [..., out] -> [..., in], in g's dtype.  The bias has no effect on gx."""
    if isinstance(w, torch.Tensor):
        if w.dtype != g.dtype:
            return torch.matmul(g.to(w.dtype), w).to(g.dtype)
        return torch.matmul(g, w)
    return w.linear_grad_input(g)


# ----------------------------------------------------------------------------
# RMSNorm (frozen gamma)


def rmsnorm_forward(x, weight, eps):
    """y = weight * cast_back(x / sqrt(mean(x^2) + eps)).   x [..., d], weight [d] -> [..., d].

    Mirrors HF LlamaRMSNorm / Qwen2RMSNorm bit for bit when weight has x's dtype:
    normalize in fp32, cast back to the input dtype, *then* multiply by the weight.
    (weight is cast to x's dtype so the result is always in x's dtype.)
    """
    in_dtype = x.dtype
    xf = x.to(acc_dtype(in_dtype))
    variance = xf.pow(2).mean(-1, keepdim=True)
    xn = xf * torch.rsqrt(variance + eps)
    del xf, variance
    return weight.to(in_dtype) * xn.to(in_dtype)


@torch.no_grad()
def rmsnorm_backward(gy, x, weight, eps):
    """gx for y = rmsnorm(x; weight) with weight frozen.  gy, x [..., d] -> gx [..., d].

    With nu = sqrt(mean(x^2) + eps) and ghat = gy * weight:
        gx = ghat / nu - x * mean(ghat * x) / nu^3
    (the cast back to the input dtype in the forward is the identity for gradients).
    Computed in fp32 (or fp64), returned in x's dtype.
    """
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # 1/nu, [..., 1]
    ghat = gy.to(acc) * weight.to(acc)
    # mean(ghat * x) * rstd^3 is a [..., 1] column; fold it into a single coefficient
    coef = (ghat * xf).mean(-1, keepdim=True).mul_(rstd.pow(3))
    gx = ghat.mul_(rstd)  # reuse ghat's storage: ghat is dead after this line
    gx.sub_(xf * coef)
    del xf, coef, rstd
    return gx.to(x.dtype)


def rmsnorm_offset_forward(x, weight, eps):
    """Gemma's RMSNorm: y = cast_back((x / sqrt(mean(x^2) + eps)) * (1 + weight)), all in fp32.
    x [..., d], weight [d] (stored as an offset from 1) -> [..., d].

    Mirrors HF Gemma3RMSNorm bit for bit: unlike Llama's, the weight multiplies before the cast back."""
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    xn = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    del xf
    return (xn * (1.0 + weight.to(acc))).to(x.dtype)


@torch.no_grad()
def rmsnorm_offset_backward(gy, x, weight, eps):
    """gx for y = rmsnorm_offset(x; weight), weight frozen: rmsnorm_backward with the effective weight 1 + weight
    (where the casts fall changes no gradient)."""
    return rmsnorm_backward(gy, x, 1.0 + weight.to(acc_dtype(x.dtype)), eps)


# ----------------------------------------------------------------------------
# RoPE (HF "rotate_half" convention: the two halves of head_dim form the pairs)


def rope_inv_freq(head_dim, theta, scaling=None):
    """Inverse frequencies [head_dim // 2] (fp32), exactly as transformers computes them.

    scaling: None or an HF rope_scaling / rope_parameters dict. rope_type (or legacy
    "type") "default" means no scaling; "llama3" follows _compute_llama3_parameters;
    anything else raises ValueError.
    """
    # same expression as transformers (int64 arange -> float32, fp32 pow)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim))
    if scaling is None:
        return inv_freq
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope scaling type {rope_type!r} (supported: None, 'default', 'llama3')")
    try:
        factor = scaling["factor"]
        low_freq_factor = scaling["low_freq_factor"]
        high_freq_factor = scaling["high_freq_factor"]
        old_context_len = scaling["original_max_position_embeddings"]
    except KeyError as e:
        raise ValueError(f"llama3 rope scaling is missing {e.args[0]!r}") from e
    # verbatim transcription of transformers' _compute_llama3_parameters
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def rope_cos_sin(positions, head_dim, theta, scaling=None, dtype=torch.float32):
    """cos, sin tables for positions.  positions LongTensor [T] or [B, T] -> [T, D] or [B, T, D].

    Same arithmetic as HF LlamaRotaryEmbedding.forward: fp32 angles pos * inv_freq,
    duplicated over the two halves (cat(freqs, freqs)), cos/sin in fp32, then cast to
    ``dtype`` (pass the activation dtype to match HF exactly).
    """
    inv_freq = rope_inv_freq(head_dim, theta, scaling).to(positions.device)
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    del freqs
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    """R(x) = cat(-x2, x1) over the last dim (x1, x2 = the two halves)."""
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _rotate_half_t(x):
    """R^T(x) = cat(x2, -x1): the transpose (= inverse = -R) of rotate_half."""
    h = x.shape[-1] // 2
    return torch.cat((x[..., h:], -x[..., :h]), dim=-1)


def _bcast_rope(t, x):
    # [T, D] broadcasts against [B, H, T, D] as is; [B, T, D] needs a head axis.
    t = t.to(x.dtype)
    return t.unsqueeze(1) if t.dim() == 3 else t


def rope_forward(x, cos, sin):
    """y = x * cos + R(x) * sin.  x [B, H, T, D]; cos, sin [T, D] or [B, T, D] -> [B, H, T, D].

    Computed in x's dtype (cos/sin cast to it), like HF apply_rotary_pos_emb.
    """
    cos, sin = _bcast_rope(cos, x), _bcast_rope(sin, x)
    y = rotate_half(x).mul_(sin)
    y.add_(x * cos)  # same sum as HF ((x*cos) + (R(x)*sin)); fp addition commutes
    return y


@torch.no_grad()
def rope_backward(gy, cos, sin):
    """gx = gy * cos + R^T(gy * sin).   gy [B, H, T, D] -> gx [B, H, T, D].

    y = (C + S R) x with diagonal C, S, so gx = (C + R^T S) gy. With HF's duplicated
    halves this is the inverse rotation gy * cos - R(gy) * sin; the form used here is
    exact for any cos/sin tables.
    """
    cos, sin = _bcast_rope(cos, gy), _bcast_rope(sin, gy)
    gx = _rotate_half_t(gy * sin)
    gx.add_(gy * cos)
    return gx


# ----------------------------------------------------------------------------
# SwiGLU


def swiglu_forward(gate, up):
    """m = silu(gate) * up.  gate, up [..., F] -> [..., F] (same as HF's act_fn(gate) * up)."""
    return F.silu(gate) * up


@torch.no_grad()
def swiglu_backward(g, gate, up):
    """(g_gate, g_up) for m = silu(gate) * up.   g, gate, up [..., F].

    g_up   = g * silu(gate)
    g_gate = g * up * sigma(gate) * (1 + gate * (1 - sigma(gate)))
    silu(gate) is recomputed here (MeSP keeps G and U, not M). Computed in fp32 (or fp64),
    returned in the input dtype.
    """
    dtype = gate.dtype
    acc = acc_dtype(dtype)
    gf = gate.to(acc)
    s = torch.sigmoid(gf)
    g_up = (gf * s).mul_(g).to(dtype)
    ds = torch.sub(1, s).mul_(gf).add_(1).mul_(s)  # d silu / d gate
    del s, gf
    g_gate = ds.mul_(g).mul_(up).to(dtype)
    return g_gate, g_up


def geglu_forward(gate, up):
    """m = gelu_tanh(gate) * up (Gemma's MLP; HF's gelu_pytorch_tanh).  gate, up [..., F] -> [..., F]."""
    return F.gelu(gate, approximate="tanh") * up


@torch.no_grad()
def geglu_backward(g, gate, up):
    """(g_gate, g_up) for m = gelu_tanh(gate) * up.   g, gate, up [..., F].

    With c = sqrt(2/pi), u = c (x + 0.044715 x^3), t = tanh(u):
        gelu_tanh(x) = 0.5 x (1 + t)
        d/dx         = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 * 0.044715 x^2)
    g_up = g * gelu_tanh(gate); g_gate = g * up * d/dx. Computed in fp32 (or fp64), returned in the input dtype.
    """
    dtype = gate.dtype
    acc = acc_dtype(dtype)
    x = gate.to(acc)
    c = math.sqrt(2.0 / math.pi)
    t = torch.tanh(x.pow(3).mul_(0.044715).add_(x).mul_(c))
    g_up = torch.add(t, 1).mul_(x).mul_(0.5).mul_(g).to(dtype)
    slope = x.pow(2).mul_(3 * 0.044715 * c).add_(c)  # c (1 + 3 * 0.044715 x^2)
    slope.mul_(x).mul_(torch.mul(t, t).neg_().add_(1)).add_(t).add_(1).mul_(0.5)
    del x, t
    g_gate = slope.mul_(g).mul_(up).to(dtype)
    return g_gate, g_up


# ----------------------------------------------------------------------------
# LoRA linear: y = x W^T (+ b) + scale * (x A^T) B^T


def lora_linear_forward(x, w, bias, A, B, scale, return_h=False):
    """x [..., in]; W [out, in] frozen; bias [out] or None; A [r, in], B [out, r] or None.

    The LoRA branch runs in the LoRA weights' dtype (x is cast to it, as PEFT does) and
    is added to the frozen path in x's dtype. MeSP does not keep h = x A^T [..., r]: the
    backward recomputes it (r << in). return_h=True returns (y, h) for the paper's
    store-h ablation (h is None without LoRA).
    """
    y = frozen_linear(x, w, bias)
    if A is None:
        return (y, None) if return_h else y
    h = torch.matmul(x.to(A.dtype), A.t())
    if y.dtype == A.dtype and y.is_contiguous() and not torch.is_grad_enabled():  # y += scale * h B^T in one product, no [.., out] temp
        y.view(-1, y.shape[-1]).addmm_(h.view(-1, h.shape[-1]), B.to(A.dtype).t(), alpha=scale)
    else:
        y = y + torch.matmul(h, B.to(A.dtype).t()).mul_(scale).to(y.dtype)
    return (y, h) if return_h else y


@torch.no_grad()
def lora_linear_backward(g, x, w, A, B, scale, need_input_grad=True, h=None):
    """Backward of :func:`lora_linear_forward`; only x was stored (or also h, when given).

    g [..., out], x [..., in] -> (gx [..., in] or None, gA [r, in] or None, gB [out, r] or None)
      h  = x A^T                (recomputed)             [..., r]
      gB = scale * g^T h        (summed over leading dims)
      gh = scale * g B                                    [..., r]
      gA = gh^T x
      gx = gh A + g W           (frozen path via frozen_linear_grad_input)
    gA, gB come back in A's / B's dtype, gx in g's dtype. ``scale`` is applied to the
    small [.., r] / [out, r] results instead of to g, so no extra g-sized temporary.
    """
    gx = frozen_linear_grad_input(g, w) if need_input_grad else None
    if A is None:
        return gx, None, None
    ldt = A.dtype
    x2 = x.reshape(-1, x.shape[-1]).to(ldt)
    g2 = g.reshape(-1, g.shape[-1]).to(ldt)
    h = torch.matmul(x2, A.t()) if h is None else h.reshape(-1, A.shape[0])  # [N, r]
    gB = torch.matmul(g2.t(), h).mul_(scale)  # [out, r]
    del h
    gh = torch.matmul(g2, B.to(ldt)).mul_(scale)  # [N, r]
    del g2
    gA = torch.matmul(gh.t(), x2)  # [r, in]
    del x2
    if need_input_grad:
        if gx.dtype == ldt and gx.is_contiguous():  # gx += gh A in one product, no [.., in] temp
            gx.view(-1, gx.shape[-1]).addmm_(gh, A)
        else:
            gx.add_(torch.matmul(gh, A).reshape(gx.shape).to(gx.dtype))
    return gx, gA.to(A.dtype), gB.to(B.dtype)
