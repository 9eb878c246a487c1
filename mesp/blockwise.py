"""The blockwise kernels, llm.c style: causal attention and the LM head's cross-entropy, each forward beside its
hand-derived backward, computed block by block so neither a [heads, T, T] score matrix nor [N, V] logits ever
exist. Same conventions as mesp.ops (accumulation dtype, frozen weights as tensors or objects); the kernels run
under ``torch.no_grad()`` (in-place ops), ``attention_reference`` stays differentiable for the baselines and tests.
"""

from __future__ import annotations

import math

import torch

from .ops import acc_dtype
from .quant import FrozenWeight

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
def attention_delta(go, o):
    """delta = rowsum(go * o) [B, Hq, T] in the accumulation dtype, from go, o [B, Hq, T, D] (any slice of rows):
    what attention_backward reads of o, so a caller that has it may drop o first."""
    acc = acc_dtype(o.dtype)
    return (go.to(acc) * o.to(acc)).sum(-1)


@torch.no_grad()
def attention_backward(go, q, k, v, o, lse, key_mask=None, scale=None, block_size=128, window=None, delta=None):
    """Backward of :func:`attention_forward`.  Returns (gq, gk, gv) shaped/dtyped like q, k, v.
    `delta` (attention_delta of go and o, [B, Hq, T]) may be given instead of o (then None).

    P is recomputed block by block from q, k and lse (never stored whole):
        delta = rowsum(go * o)  (== rowsum(gP * P))
        gP = go v^T;  gS = P * (gP - delta)
        gq = scale * gS k;  gk = scale * gS^T q;  gv = P^T go
    gk, gv are summed over the G query heads of each kv head and accumulated over blocks
    in the accumulation dtype.
    """
    (B, Hq, Hkv, G, T, D), scale, acc, kf, vf, q5 = _attention_setup(q, k, v, scale)
    go5 = go.reshape(B, Hkv, G, T, D)
    delta5 = (attention_delta(go, o) if delta is None else delta).reshape(B, Hkv, G, T, 1)
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
        delta_b = delta5[:, :, :, i0:i1].to(acc)  # [B, Hkv, G, Tb, 1]
        S = _scores_block(qb, kf, i0, i1, key_mask, scale, window)
        P = S.sub_(lse5[:, :, :, i0:i1].to(acc).unsqueeze(-1)).exp_()  # masked entries -> 0
        del S
        # gv[:i1] += P^T go, summed over the G heads and the Tb rows of the block at once
        gv[:, :, :i1] += torch.matmul(
            P.reshape(B, Hkv, G * Tb, i1).transpose(-1, -2), gob.reshape(B, Hkv, G * Tb, D)
        )
        gS = torch.matmul(gob, vf[:, :, :i1].unsqueeze(2).transpose(-1, -2))  # gP [B,Hkv,G,Tb,i1]
        del gob
        gS.sub_(delta_b).mul_(P).mul_(scale)  # gS (scale folded in for both gq and gk)
        del P, delta_b
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
                          chunk_bytes=8 << 20, softcap=None, rows=None):
    """Summed cross-entropy of (hidden W^T) against targets, plus dL/dhidden for L = sum/normalizer.

    hidden [N, d] (final-normed, already shifted); weight [V, d] (tensor or quantized object);
    targets LongTensor [N], -100 = ignored (those rows never touch the LM head);
    normalizer: number or scalar tensor (e.g. the count of target tokens).
    rows: the rows to run when the caller fixes them beforehand (a program exported for fixed shapes,
    mesp.export_executorch, where a data-dependent nonzero cannot be traced): any of them whose target is
    -100 counts for nothing (zero loss, zero gradient); None = exactly the rows with a target.
    Returns (loss_sum fp32 0-dim tensor, g_hidden [N, d] in hidden's dtype or None).

    Full [N, V] logits never exist. Counted rows go in blocks of at most chunk_size tokens, and each block
    meets the vocabulary in slices of Vc rows of W, with Vc chosen so one fp32 logits slice [n, Vc] stays
    within chunk_bytes (and so do a slice's [Vc, d] rows of W, which a quantized or streamed W dequantizes).
    One pass over the slices gives both the loss and the gradient, so W (V x d, the largest weight) meets each
    block in two products, as in autograd (logits, then g_logits W), not three (a log-sum-exp pass first):
    the softmax's normalizer is unknown until the last slice, so the gradient is accumulated unnormalized
    against the running max and rescaled whenever the max grows, as flash attention does:
      per slice: m' = max(m, rowmax(logits)); a = exp(m - m'); p = exp(logits - m')
                 s = a s + rowsum(p);  acc = a acc + p W_slice;  m = m'
      at the end: lse = m + log s; loss += sum(lse - logit[target])
                  g_hidden = (acc / s - W[target]) / normalizer      (softmax W - onehot W)
    softcap (Gemma's final_logit_softcapping): logits become softcap * tanh(logits / softcap), and both terms
    of the gradient carry that map's derivative 1 - tanh^2 (p's per element, the target's at the target).
    """
    acc_dt = acc_dtype(hidden.dtype)
    loss_sum = torch.zeros((), dtype=acc_dt, device=hidden.device)
    g_hidden = torch.zeros_like(hidden) if compute_grad else None
    masked = rows is not None  # fixed rows may hold ignored targets: their terms are multiplied by 0
    if rows is None:
        rows = (targets != -100).nonzero().squeeze(1)
    V = weight.shape[0]
    for c0 in range(0, rows.numel(), chunk_size):
        idx = rows[c0 : c0 + chunk_size]
        n = idx.numel()
        h, t = hidden[idx], targets[idx]
        if masked:
            counted = (t != -100).to(acc_dt)
            t = t.clamp(min=0)  # an ignored row looks up row 0 of W, then counts for nothing
        # a quantized or streamed head decodes each slice, so its [Vc, d] rows are bounded too; every form of
        # the head takes the same slices, so they all sum g_hidden in the same order (bit-identical results)
        vc = max(1, min(V, chunk_bytes // (n * 4), chunk_bytes // (h.shape[-1] * 4)))
        m = torch.full((n,), float("-inf"), dtype=acc_dt, device=h.device)
        s = torch.zeros(n, dtype=acc_dt, device=h.device)
        target_logit = torch.zeros(n, dtype=acc_dt, device=h.device)
        target_slope = None if softcap is None else torch.zeros(n, dtype=acc_dt, device=h.device)
        acc = torch.zeros(n, h.shape[-1], dtype=acc_dt, device=h.device) if compute_grad else None
        for v0 in range(0, V, vc):
            v1 = min(V, v0 + vc)
            w = weight_rows(weight, v0, v1).to(h.dtype)
            p, slope = _logits_slice(h, w, softcap)  # [n, v1-v0]
            # each row's target logit from the slice holding it, by a gather of fixed shape (traceable)
            inside = (t >= v0) & (t < v1)
            local = (t - v0).clamp_(0, v1 - v0 - 1)[:, None]
            target_logit = torch.where(inside, p.gather(1, local).squeeze(1), target_logit)
            if slope is not None:
                target_slope = torch.where(inside, slope.gather(1, local).squeeze(1), target_slope)
            m_new = torch.maximum(m, p.amax(dim=-1))
            rescale = torch.exp(m - m_new)
            p.sub_(m_new[:, None]).exp_()
            s.mul_(rescale).add_(p.sum(dim=-1))
            m = m_new
            if compute_grad:
                if slope is not None:
                    p.mul_(slope)
                acc.mul_(rescale[:, None])
                if h.dtype == acc_dt:  # acc += p W_slice in one product, no [n, d] temporary
                    acc.addmm_(p, w)
                else:
                    acc.add_(torch.matmul(p.to(h.dtype), w).to(acc_dt))
            del p, slope, w
        lse = m.add_(s.log())
        row_loss = lse - target_logit
        loss_sum += (row_loss * counted if masked else row_loss).sum()
        if not compute_grad:
            continue
        target_rows = weight_rows(weight, t).to(acc_dt)
        if target_slope is not None:
            target_rows.mul_(target_slope[:, None])
        g_rows = acc.div_(s[:, None]).sub_(target_rows).div_(normalizer)
        g_hidden[idx] = (g_rows.mul_(counted[:, None]) if masked else g_rows).to(hidden.dtype)
    return loss_sum, g_hidden


def weight_rows(weight, v0, v1=None):
    """Rows [v0, v1) of a frozen [V, d] weight as a tensor (or, with v1 None, the rows whose indices v0 lists): a
    view, or only those rows dequantized."""
    if isinstance(weight, torch.Tensor):
        return weight[v0] if v1 is None else weight[v0:v1]
    if v1 is None:
        return weight.rows(v0)
    if isinstance(weight, FrozenWeight):  # the range as a slice (a traced step has no ids to check)
        return weight.dense_rows(v0, v1, weight.dtype)
    return weight.rows(torch.arange(v0, v1, device=weight.device))


def _logits_slice(h, w, softcap=None):
    """h [n, d] against vocabulary rows w [Vc, d] -> (logits [n, Vc] in the accumulation dtype, None); with
    softcap, the capped logits and d(capped)/d(logits)."""
    logits = torch.matmul(h, w.t()).to(acc_dtype(h.dtype))
    if softcap is None:
        return logits, None
    t = logits.div_(softcap).tanh_()
    return t * softcap, torch.mul(t, t).neg_().add_(1)


def softcap_logits(logits, softcap):
    """softcap * tanh(logits / softcap) (identity for softcap None): the map the chunked loss applies, for the
    differentiable paths (full logits, generation)."""
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap
