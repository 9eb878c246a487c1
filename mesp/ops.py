"""Forward/backward pairs for the ops of a decoder layer, llm.c style.

Every op's forward sits next to its hand-derived backward. The backward functions
use no autograd: they are called under ``torch.no_grad()`` by the MeSP layer code
and only ever see the tensors the caller chose to keep. Which of them a family's
layer uses is said in mesp.families (``NORMS``, ``ACTIVATIONS``).

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
* Backward functions and the blockwise kernels (attention_forward, lm_head_cross_entropy)
  run under ``torch.no_grad()`` (they use in-place ops autograd could not follow); the
  plain forwards (rmsnorm, rope, swiglu, lora_linear, attention_reference) stay
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
    "causal_visibility",
    "attention_forward",
    "attention_backward",
    "attention_reference",
    "lm_head_cross_entropy",
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
    lora = torch.matmul(h, B.to(A.dtype).t())
    if not return_h:
        del h
    lora.mul_(scale)
    y.add_(lora.to(y.dtype))
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
        gx.add_(torch.matmul(gh, A).reshape(gx.shape).to(gx.dtype))
    return gx, gA.to(A.dtype), gB.to(B.dtype)


# ----------------------------------------------------------------------------
# Attention (causal, grouped-query, key padding)


def causal_visibility(q_start, q_end, k_len, key_mask=None, device=None, window=None):
    """Boolean visibility block for queries [q_start, q_end) against keys [0, k_len).

    Key j is visible to query i iff j <= i, i - j < window (sliding-window layers; window None = unbounded) and
    (key_mask[b, j] or j == i). The diagonal is always visible so that padded query rows never become all -inf
    (NaN softmax). Returns [Tq, k_len] when key_mask is None, else [B, Tq, k_len]. Shared by the reference, the
    blockwise kernels and the model's SDPA mask so the rule exists exactly once.
    """
    if key_mask is not None:
        device = key_mask.device
    i = torch.arange(q_start, q_end, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    vis = j <= i
    if window is not None:
        vis = vis & (j > i - window)
    if key_mask is None:
        return vis
    return vis & (key_mask[:, None, :k_len].to(torch.bool) | (j == i))


def _gqa_split(q, k):
    B, Hq, T, D = q.shape
    Bk, Hkv, Tk, Dk = k.shape
    if Hq % Hkv != 0 or (B, T, D) != (Bk, Tk, Dk):
        raise ValueError(f"incompatible q {tuple(q.shape)} and k {tuple(k.shape)}")
    return B, Hq, Hkv, Hq // Hkv, T, D


def _attention_setup(q, k, v, scale):
    """What attention_forward and attention_backward both start from: the shapes, the scale (default
    1/sqrt(D)), the accumulation dtype, k/v upcast once (Hkv-sized, smaller than a score block for typical
    shapes) and q viewed per kv group as [B, Hkv, G, T, D]."""
    B, Hq, Hkv, G, T, D = _gqa_split(q, k)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    acc = acc_dtype(q.dtype)
    return (B, Hq, Hkv, G, T, D), scale, acc, k.to(acc), v.to(acc), q.reshape(B, Hkv, G, T, D)


def _scores_block(qb, kf, i0, i1, key_mask, scale, window=None):
    """Masked scaled scores for query rows [i0, i1): qb [B, Hkv, G, Tb, D] (acc dtype),
    kf [B, Hkv, T, D] (acc dtype) -> S [B, Hkv, G, Tb, i1] (acc dtype).

    Causality means query rows < i1 never see keys >= i1, so only keys [0, i1) are used.
    """
    kb = kf[:, :, :i1]
    S = torch.matmul(qb, kb.unsqueeze(2).transpose(-1, -2))  # [B, Hkv, G, Tb, i1]
    S.mul_(scale)
    vis = causal_visibility(i0, i1, i1, key_mask, device=S.device, window=window)
    if vis.dim() == 3:  # [B, Tb, i1] -> [B, 1, 1, Tb, i1]
        vis = vis[:, None, None]
    S.masked_fill_(~vis, float("-inf"))
    return S


@torch.no_grad()
def attention_forward(q, k, v, key_mask=None, scale=None, block_size=128, window=None):
    """Causal GQA attention, blockwise over query rows.

    q [B, Hq, T, D]; k, v [B, Hkv, T, D] with Hq % Hkv == 0; key_mask bool [B, T] (True = real); window: a
    sliding-window layer's span (causal_visibility), None for full attention.
    Returns (o [B, Hq, T, D] in q's dtype, lse [B, Hq, T] fp32 (fp64 for fp64 inputs)).

    k/v are never repeated: q is viewed as [B, Hkv, G, T, D] and the G query heads of a
    group broadcast against their kv head. Each query block computes its full (causally
    truncated) score rows at once, so a plain two-pass softmax per block is exact; peak
    extra memory is one [B, Hq, block, T] score block in the accumulation dtype.
    """
    (B, Hq, Hkv, G, T, D), scale, acc, kf, vf, q5 = _attention_setup(q, k, v, scale)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous, whatever q's strides
    o5 = o.view(B, Hkv, G, T, D)
    lse = torch.empty(B, Hkv, G, T, dtype=acc, device=q.device)
    for i0 in range(0, T, block_size):
        i1 = min(i0 + block_size, T)
        S = _scores_block(q5[:, :, :, i0:i1].to(acc), kf, i0, i1, key_mask, scale, window)
        m = torch.logsumexp(S, dim=-1)  # [B, Hkv, G, Tb]; finite: diagonal always visible
        lse[:, :, :, i0:i1] = m
        P = S.sub_(m.unsqueeze(-1)).exp_()  # softmax, in place over the score block
        del S
        o5[:, :, :, i0:i1] = torch.matmul(P, vf[:, :, :i1].unsqueeze(2)).to(o.dtype)
        del P
    return o, lse.view(B, Hq, T)


@torch.no_grad()
def attention_backward(go, q, k, v, o, lse, key_mask=None, scale=None, block_size=128, window=None):
    """Backward of :func:`attention_forward`.  Returns (gq, gk, gv) shaped/dtyped like q, k, v.

    P is recomputed block by block from q, k and lse (never stored whole):
        delta = rowsum(go * o)  (== rowsum(gP * P))
        gP = go v^T;  gS = P * (gP - delta)
        gq = scale * gS k;  gk = scale * gS^T q;  gv = P^T go
    gk, gv are summed over the G query heads of each kv head and accumulated over blocks
    in the accumulation dtype.
    """
    (B, Hq, Hkv, G, T, D), scale, acc, kf, vf, q5 = _attention_setup(q, k, v, scale)
    go5 = go.reshape(B, Hkv, G, T, D)
    o5 = o.reshape(B, Hkv, G, T, D)
    lse5 = lse.reshape(B, Hkv, G, T)
    gq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    gq5 = gq.view(B, Hkv, G, T, D)
    gk = torch.zeros(B, Hkv, T, D, dtype=acc, device=q.device)
    gv = torch.zeros(B, Hkv, T, D, dtype=acc, device=q.device)
    for i0 in range(0, T, block_size):
        i1 = min(i0 + block_size, T)
        Tb = i1 - i0
        qb = q5[:, :, :, i0:i1].to(acc)  # [B, Hkv, G, Tb, D]
        gob = go5[:, :, :, i0:i1].to(acc)
        delta = (gob * o5[:, :, :, i0:i1].to(acc)).sum(-1, keepdim=True)  # [B, Hkv, G, Tb, 1]
        S = _scores_block(qb, kf, i0, i1, key_mask, scale, window)
        P = S.sub_(lse5[:, :, :, i0:i1].to(acc).unsqueeze(-1)).exp_()  # masked entries -> 0
        del S
        # gv[:i1] += P^T go, summed over the G heads and the Tb rows of the block at once
        gv[:, :, :i1] += torch.matmul(
            P.reshape(B, Hkv, G * Tb, i1).transpose(-1, -2), gob.reshape(B, Hkv, G * Tb, D)
        )
        gS = torch.matmul(gob, vf[:, :, :i1].unsqueeze(2).transpose(-1, -2))  # gP [B,Hkv,G,Tb,i1]
        del gob
        gS.sub_(delta).mul_(P).mul_(scale)  # gS (scale folded in for both gq and gk)
        del P, delta
        gq5[:, :, :, i0:i1] = torch.matmul(gS, kf[:, :, :i1].unsqueeze(2)).to(gq.dtype)
        gk[:, :, :i1] += torch.matmul(
            gS.reshape(B, Hkv, G * Tb, i1).transpose(-1, -2), qb.reshape(B, Hkv, G * Tb, D)
        )
        del gS, qb
    return gq, gk.to(k.dtype), gv.to(v.dtype)


def attention_reference(q, k, v, key_mask=None, scale=None, window=None):
    """Plain differentiable attention with the same visibility rule; returns o [B, Hq, T, D].

    Like HF's eager attention: scores in the input dtype, softmax in fp32 (fp64 for fp64),
    probabilities cast back. Repeats k/v (memory is not the point here).
    """
    B, Hq, Hkv, G, T, D = _gqa_split(q, k)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if G > 1:
        k = k.repeat_interleave(G, dim=1)
        v = v.repeat_interleave(G, dim=1)
    S = torch.matmul(q, k.transpose(-1, -2)) * scale
    vis = causal_visibility(0, T, T, key_mask, device=q.device, window=window)
    if vis.dim() == 3:
        vis = vis[:, None]
    S = S.masked_fill(~vis, float("-inf"))
    P = torch.softmax(S, dim=-1, dtype=acc_dtype(q.dtype)).to(q.dtype)
    return torch.matmul(P, v)


# ----------------------------------------------------------------------------
# LM head + cross-entropy, chunked over counted rows


@torch.no_grad()
def lm_head_cross_entropy(hidden, weight, targets, normalizer, chunk_size=1024, compute_grad=True,
                          chunk_bytes=8 << 20):
    """Summed cross-entropy of (hidden W^T) against targets, plus dL/dhidden for L = sum/normalizer.

    hidden [N, d] (final-normed, already shifted); weight [V, d] (tensor or quantized object);
    targets LongTensor [N], -100 = ignored (those rows never touch the LM head);
    normalizer: number or scalar tensor (e.g. the count of target tokens).
    Returns (loss_sum fp32 0-dim tensor, g_hidden [N, d] in hidden's dtype or None).

    Full [N, V] logits never exist. Counted rows go in blocks of at most chunk_size tokens, and each block
    meets the vocabulary in slices of Vc rows of W, with Vc chosen so one fp32 logits slice [n, Vc] stays
    within chunk_bytes. Slicing the vocabulary rather than the tokens matters for speed: W (V x d, the
    largest weight) is then read three times per block (log-sum-exp pass, then recompute + gradient pass)
    instead of twice per handful of tokens.
      pass 1: online log-sum-exp over slices: m = running max, s = running sum of exp(logit - m);
              lse = m + log s; loss += sum(lse - logit[target])
      pass 2: per slice, g_logits = (exp(logit - lse) - onehot) / normalizer, built in place;
              g_hidden += g_logits W_slice
    """
    acc = acc_dtype(hidden.dtype)
    loss_sum = torch.zeros((), dtype=acc, device=hidden.device)
    g_hidden = torch.zeros_like(hidden) if compute_grad else None
    rows = (targets != -100).nonzero().squeeze(1)
    V = weight.shape[0]
    for c0 in range(0, rows.numel(), chunk_size):
        idx = rows[c0 : c0 + chunk_size]
        n = idx.numel()
        h, t = hidden[idx], targets[idx]
        vc = max(1, min(V, chunk_bytes // (n * 4)))
        slices = [(v0, min(V, v0 + vc)) for v0 in range(0, V, vc)]
        m = torch.full((n,), float("-inf"), dtype=acc, device=h.device)
        s = torch.zeros(n, dtype=acc, device=h.device)
        target_logit = torch.zeros(n, dtype=acc, device=h.device)
        for v0, v1 in slices:
            logits = _logits_slice(h, weight, v0, v1, acc)  # [n, v1-v0]
            inside = (t >= v0) & (t < v1)
            target_logit[inside] = logits[inside, t[inside] - v0]
            m_new = torch.maximum(m, logits.amax(dim=-1))
            s.mul_(torch.exp(m - m_new)).add_(logits.sub_(m_new[:, None]).exp_().sum(dim=-1))
            m = m_new
            del logits
        lse = m.add_(s.log_())
        loss_sum += (lse - target_logit).sum()
        if not compute_grad:
            continue
        gh = torch.zeros(n, h.shape[-1], dtype=acc, device=h.device)
        for v0, v1 in slices:
            g = _logits_slice(h, weight, v0, v1, acc).sub_(lse[:, None]).exp_()  # softmax slice, in place
            inside = (t >= v0) & (t < v1)
            g[inside.nonzero().squeeze(1), t[inside] - v0] -= 1.0
            g.div_(normalizer)
            gh.add_(torch.matmul(g.to(h.dtype), weight_rows(weight, v0, v1).to(h.dtype)).to(acc))
            del g
        g_hidden[idx] = gh.to(hidden.dtype)
    return loss_sum, g_hidden


def weight_rows(weight, v0, v1):
    """Rows [v0, v1) of a frozen [V, d] weight as a tensor: a view, or only those rows dequantized."""
    if isinstance(weight, torch.Tensor):
        return weight[v0:v1]
    return weight.rows(torch.arange(v0, v1, device=weight.device))


def _logits_slice(h, weight, v0, v1, acc):
    """h [n, d] against vocabulary rows [v0, v1) -> logits [n, v1-v0] in the accumulation dtype."""
    w = weight_rows(weight, v0, v1)
    return torch.matmul(h, w.to(h.dtype).t()).to(acc)
