"""Hand-written backwards in mesp.ops checked against torch.autograd on the same forward."""

import math

import pytest
import torch
import torch.nn.functional as F

from mesp import ops
from mesp.testing import relative_error

TOL = 1e-5


def assert_close(a, b, tol=TOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.linalg.norm(b.double()) > 0, "reference is all zeros: test would be vacuous"
    r = relative_error(a, b)
    assert r <= tol, f"relative error {r:.3e} > {tol:.1e}"


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=torch.float64, g=None, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


class FakeQuant:
    """Stand-in for a quantized frozen weight: exposes only the quantized-weight protocol."""

    def __init__(self, w):
        self._w = w
        self.shape, self.device = w.shape, w.device

    def rows(self, ids):
        return self._w[ids]

    def linear(self, x):
        return x @ self._w.t()

    def linear_grad_input(self, g):
        return g @ self._w


# ----------------------------------------------------------------------------- rmsnorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rmsnorm_backward(dtype):
    g = gen(1)
    x = randn(2, 3, 16, dtype=dtype, g=g).requires_grad_()
    w = randn(16, dtype=dtype, g=g)
    gy = randn(2, 3, 16, dtype=dtype, g=g)
    y = ops.rmsnorm_forward(x, w, 1e-6)
    (gx_ref,) = torch.autograd.grad(y, x, gy)
    with torch.no_grad():
        gx = ops.rmsnorm_backward(gy, x.detach(), w, 1e-6)
    assert gx.dtype == dtype
    assert_close(gx, gx_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_hf(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = gen(2)
    x = randn(3, 32, dtype=dtype, g=g, scale=3.0)
    m = LlamaRMSNorm(32, eps=1e-5).to(dtype)
    with torch.no_grad():
        m.weight.copy_(randn(32, dtype=dtype, g=g))
        ref = m(x)
    y = ops.rmsnorm_forward(x, m.weight.detach(), 1e-5)
    assert y.dtype == dtype
    assert torch.equal(y, ref)


# ----------------------------------------------------------------------------- rope


def test_rope_backward_is_inverse_and_matches_autograd():
    g = gen(3)
    D = 8
    cos, sin = ops.rope_cos_sin(torch.arange(5), D, 10000.0, dtype=torch.float64)
    x = randn(2, 3, 5, D, g=g).requires_grad_()
    gy = randn(2, 3, 5, D, g=g)
    y = ops.rope_forward(x, cos, sin)
    (gx_ref,) = torch.autograd.grad(y, x, gy)
    gx = ops.rope_backward(gy, cos, sin)
    assert_close(gx, gx_ref)
    # a rotation: backward of the forward output gives the input back (cos/sin tables are
    # fp32 values, so cos^2 + sin^2 == 1 only to ~1e-7)
    assert_close(ops.rope_backward(y.detach(), cos, sin), x.detach(), 1e-6)
    # batched positions [B, T] -> [B, T, D] tables
    pos = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    cb, sb = ops.rope_cos_sin(pos, D, 10000.0, dtype=torch.float64)
    assert cb.shape == (2, 5, D)
    yb = ops.rope_forward(x.detach(), cb, sb)
    assert_close(yb[0], y.detach()[0], 1e-12)
    assert relative_error(yb[1], y.detach()[1]) > 1e-3  # different positions really rotate differently
    assert_close(ops.rope_backward(yb, cb, sb), x.detach(), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_matches_hf(dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
    rot = LlamaRotaryEmbedding(cfg)
    pos = torch.tensor([[0, 1, 2, 5, 9, 100]])
    g = gen(4)
    q = randn(1, 4, 6, 16, dtype=dtype, g=g)
    k = randn(1, 2, 6, 16, dtype=dtype, g=g)
    cos_hf, sin_hf = rot(q, pos)
    cos, sin = ops.rope_cos_sin(pos[0], 16, 10000.0, dtype=dtype)
    assert torch.equal(cos, cos_hf[0]) and torch.equal(sin, sin_hf[0])
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos_hf, sin_hf)
    assert torch.equal(ops.rope_forward(q, cos, sin), q_hf)
    assert torch.equal(ops.rope_forward(k, cos, sin), k_hf)


def test_rope_llama3_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,  # small so all three frequency bands occur
    }
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=256, rope_parameters=dict(params))
    inv_hf, attn_factor = ROPE_INIT_FUNCTIONS["llama3"](cfg)
    assert attn_factor == 1.0
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    inv = ops.rope_inv_freq(64, 500000.0, scaling)
    assert torch.equal(inv, inv_hf)
    plain = ops.rope_inv_freq(64, 500000.0)
    assert not torch.equal(inv, plain)  # scaling really changed something
    # all three regimes present: untouched, divided by factor, smoothed
    assert (inv == plain).any() and torch.isclose(inv, plain / 8).any()
    assert ((inv != plain) & ~torch.isclose(inv, plain / 8)).any()
    pos = torch.arange(300)
    cos, sin = ops.rope_cos_sin(pos, 64, 500000.0, scaling)
    freqs = pos[:, None].float() * inv_hf
    emb = torch.cat((freqs, freqs), -1)
    assert torch.equal(cos, emb.cos()) and torch.equal(sin, emb.sin())
    # legacy "type" key works too
    legacy = dict(scaling)
    legacy["type"] = legacy.pop("rope_type")
    assert torch.equal(ops.rope_inv_freq(64, 500000.0, legacy), inv_hf)


def test_rope_unsupported_scaling_raises():
    with pytest.raises(ValueError):
        ops.rope_cos_sin(torch.arange(4), 8, 10000.0, {"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError):
        ops.rope_cos_sin(torch.arange(4), 8, 10000.0, {"rope_type": "linear", "factor": 2.0})
    # "default" is no scaling
    a = ops.rope_cos_sin(torch.arange(4), 8, 10000.0, {"rope_type": "default"})
    b = ops.rope_cos_sin(torch.arange(4), 8, 10000.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------- swiglu


def test_swiglu_backward():
    g = gen(5)
    gate = randn(2, 3, 24, g=g, scale=3.0).requires_grad_()
    up = randn(2, 3, 24, g=g).requires_grad_()
    gm = randn(2, 3, 24, g=g)
    m = ops.swiglu_forward(gate, up)
    assert_close(m.detach(), F.silu(gate.detach()) * up.detach(), 1e-15)
    gg_ref, gu_ref = torch.autograd.grad(m, (gate, up), gm)
    gg, gu = ops.swiglu_backward(gm, gate.detach(), up.detach())
    assert_close(gg, gg_ref)
    assert_close(gu, gu_ref)


# ----------------------------------------------------------------------------- lora linear


@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_backward(quant, bias):
    g = gen(6)
    din, dout, r, scale = 12, 10, 3, 2.0
    x = randn(2, 5, din, g=g).requires_grad_()
    W = randn(dout, din, g=g)
    b = randn(dout, g=g) if bias else None
    A = randn(r, din, g=g).requires_grad_()
    B = randn(dout, r, g=g).requires_grad_()  # non-zero B so gA is non-trivial
    gy = randn(2, 5, dout, g=g)
    w = FakeQuant(W) if quant else W
    y = ops.lora_linear_forward(x, w, b, A, B, scale)
    y_ref = x.detach() @ W.t() + (0 if b is None else b) + scale * (x.detach() @ A.detach().t()) @ B.detach().t()
    assert_close(y.detach(), y_ref, 1e-12)
    gx_ref, gA_ref, gB_ref = torch.autograd.grad(y, (x, A, B), gy)
    with torch.no_grad():
        gx, gA, gB = ops.lora_linear_backward(gy, x.detach(), w, A.detach(), B.detach(), scale)
    assert gA.shape == (r, din) and gB.shape == (dout, r)
    assert_close(gx, gx_ref)
    assert_close(gA, gA_ref)
    assert_close(gB, gB_ref)
    with torch.no_grad():
        gx2, gA2, gB2 = ops.lora_linear_backward(gy, x.detach(), w, A.detach(), B.detach(), scale, need_input_grad=False)
    assert gx2 is None and torch.equal(gA2, gA) and torch.equal(gB2, gB)


def test_lora_linear_without_lora():
    g = gen(7)
    x = randn(4, 6, g=g).requires_grad_()
    W = randn(5, 6, g=g)
    gy = randn(4, 5, g=g)
    y = ops.lora_linear_forward(x, W, None, None, None, 2.0)
    (gx_ref,) = torch.autograd.grad(y, x, gy)
    gx, gA, gB = ops.lora_linear_backward(gy, x.detach(), W, None, None, 2.0)
    assert gA is None and gB is None
    assert_close(gx, gx_ref)
    assert ops.lora_linear_backward(gy, x.detach(), W, None, None, 2.0, need_input_grad=False) == (None, None, None)


# ----------------------------------------------------------------------------- attention


def make_mask(B, T, kind):
    m = torch.ones(B, T, dtype=torch.bool)
    if kind == "left":
        m[0, :3] = False
        if B > 1:
            m[1, :1] = False
    elif kind == "right":
        m[0, T - 2 :] = False
        if B > 1:
            m[1, T - 4 :] = False
    elif kind == "both":
        m[0, :2] = False
        if B > 1:
            m[1, T - 3 :] = False
    return m


def brute_visibility(T, key_mask, window=None):
    """Visibility rule written out with loops, independent of ops.causal_visibility (window: HF's sliding
    window, a query sees the `window` most recent positions including itself)."""
    B = key_mask.shape[0]
    vis = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            for j in range(T):
                in_window = window is None or i - j < window
                vis[b, i, j] = j <= i and in_window and (bool(key_mask[b, j]) or j == i)
    return vis


def test_causal_visibility_rule():
    T = 6
    km = make_mask(2, T, "both")
    assert torch.equal(ops.causal_visibility(0, T, T, km), brute_visibility(T, km))
    assert torch.equal(ops.causal_visibility(2, 5, 5, km), brute_visibility(T, km)[:, 2:5, :5])
    assert torch.equal(ops.causal_visibility(0, T, T), torch.ones(T, T, dtype=torch.bool).tril())


def attn_inputs(B, Hq, Hkv, T, D, dtype=torch.float64, seed=8):
    g = gen(seed)
    q = randn(B, Hq, T, D, dtype=dtype, g=g, scale=1.5)
    k = randn(B, Hkv, T, D, dtype=dtype, g=g, scale=1.5)
    v = randn(B, Hkv, T, D, dtype=dtype, g=g)
    go = randn(B, Hq, T, D, dtype=dtype, g=g)
    return q, k, v, go


ATTN_CASES = [
    # (Hq, Hkv, T, block_size, mask kind)
    (2, 2, 9, 4, "none"),
    (2, 2, 9, 128, "left"),
    (4, 2, 9, 3, "right"),
    (4, 2, 9, 1, "both"),
    (14, 2, 9, 5, "left"),
    (7, 1, 9, 2, "right"),
    (7, 1, 9, 9, "all"),
    (4, 2, 1, 1, "none"),
    (4, 2, 1, 4, "all"),
    (4, 4, 10, 7, "both"),
]


@pytest.mark.parametrize("Hq,Hkv,T,bs,kind", ATTN_CASES)
def test_attention_forward_backward(Hq, Hkv, T, bs, kind):
    B, D = 2, 4
    q, k, v, go = attn_inputs(B, Hq, Hkv, T, D)
    km = None if kind == "none" else make_mask(B, T, kind)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    o_ref = ops.attention_reference(q, k, v, km)
    gq_ref, gk_ref, gv_ref = torch.autograd.grad(o_ref, (q, k, v), go)
    with torch.no_grad():
        o, lse = ops.attention_forward(q, k, v, km, block_size=bs)
        assert o.shape == q.shape and lse.shape == (B, Hq, T)
        assert torch.isfinite(o).all() and torch.isfinite(lse).all()
        assert_close(o, o_ref.detach(), 1e-12)
        # lse against brute-force masked scores
        kk = k.repeat_interleave(Hq // Hkv, 1)
        S = q @ kk.transpose(-1, -2) / math.sqrt(D)
        vis = brute_visibility(T, km if km is not None else torch.ones(B, T, dtype=torch.bool))[:, None]
        lse_ref = torch.logsumexp(S.masked_fill(~vis, float("-inf")), -1)
        assert_close(lse, lse_ref, 1e-12)
        gq, gk, gv = ops.attention_backward(go, q, k, v, o, lse, km, block_size=bs)
    if T == 1:  # one visible key: softmax is constant, so gq and gk are exactly zero
        for a, b in ((gq, gq_ref), (gk, gk_ref)):
            assert a.shape == b.shape and a.abs().max() < 1e-12 and b.abs().max() < 1e-12
    else:
        assert_close(gq, gq_ref)
        assert_close(gk, gk_ref)
    assert_close(gv, gv_ref)


def test_attention_padding_changes_result():
    """Masking must actually hide padded keys (guards against an ignored key_mask)."""
    q, k, v, _ = attn_inputs(2, 4, 2, 8, 4)
    o_all, _ = ops.attention_forward(q, k, v, None, block_size=3)
    o_pad, _ = ops.attention_forward(q, k, v, make_mask(2, 8, "left"), block_size=3)
    assert relative_error(o_pad[0, :, 4:], o_all[0, :, 4:]) > 1e-3
    # row 0 of a left-padded sequence only sees itself: o = v of that position
    assert_close(o_pad[0, :, 0], v.repeat_interleave(2, 1)[0, :, 0], 1e-14)
    # right padding leaves real rows untouched (causality)
    o_r, _ = ops.attention_forward(q, k, v, make_mask(2, 8, "right"), block_size=3)
    assert_close(o_r[0, :, :6], o_all[0, :, :6], 1e-14)


@pytest.mark.parametrize("Hq,Hkv", [(3, 3), (4, 2), (7, 1)])
def test_attention_matches_sdpa(Hq, Hkv):
    B, T, D = 2, 11, 8
    q, k, v, _ = attn_inputs(B, Hq, Hkv, T, D, dtype=torch.float32, seed=9)
    G = Hq // Hkv
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), is_causal=True)
    for km in (None, torch.ones(B, T, dtype=torch.bool)):
        o, _ = ops.attention_forward(q, k, v, km, block_size=4)
        assert_close(o, ref, 1e-5)
        assert_close(ops.attention_reference(q, k, v, km), ref, 1e-5)


def test_attention_fp32_backward_and_non_contiguous():
    """fp32 (not just fp64) path and q/k/v coming from a [B, T, H, D] transpose."""
    B, T, Hq, Hkv, D = 1, 10, 4, 2, 8
    g = gen(10)
    q = randn(B, T, Hq, D, dtype=torch.float32, g=g).transpose(1, 2).requires_grad_()
    k = randn(B, T, Hkv, D, dtype=torch.float32, g=g).transpose(1, 2).requires_grad_()
    v = randn(B, T, Hkv, D, dtype=torch.float32, g=g).transpose(1, 2).requires_grad_()
    go = randn(B, Hq, T, D, dtype=torch.float32, g=g)
    km = make_mask(B, T, "left")
    o_ref = ops.attention_reference(q, k, v, km)
    refs = torch.autograd.grad(o_ref, (q, k, v), go)
    with torch.no_grad():
        o, lse = ops.attention_forward(q, k, v, km, block_size=3)
        grads = ops.attention_backward(go, q, k, v, o, lse, km, block_size=3)
    assert_close(o, o_ref.detach(), 1e-5)
    for a, b in zip(grads, refs):
        assert a.dtype == torch.float32
        assert_close(a, b, 1e-5)


# ----------------------------------------------------------------------------- lm head + CE


@pytest.mark.parametrize("chunk", [1, 3, 4, 1024])
@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize("chunk_bytes", [4 * 3 * 10, 8 << 20])  # vocab slices of 3 (not dividing V) or all
def test_lm_head_cross_entropy(chunk, quant, chunk_bytes):
    g = gen(11)
    N, d, V = 10, 8, 13
    h = randn(N, d, g=g).requires_grad_()
    W = randn(V, d, g=g)
    t = torch.randint(0, V, (N,), generator=g)
    t[[0, 4, 5]] = -100
    norm = float((t != -100).sum())
    loss_sum, gh = ops.lm_head_cross_entropy(h.detach(), FakeQuant(W) if quant else W, t, norm, chunk_size=chunk,
                                             chunk_bytes=chunk_bytes)
    ref = F.cross_entropy(h @ W.t(), t, ignore_index=-100, reduction="sum")
    (gh_ref,) = torch.autograd.grad(ref / norm, h)
    assert loss_sum.dim() == 0
    assert_close(loss_sum, ref.detach(), 1e-12)
    assert_close(gh, gh_ref)
    assert torch.all(gh[[0, 4, 5]] == 0)
    loss2, none = ops.lm_head_cross_entropy(h.detach(), W, t, norm, chunk_size=chunk, compute_grad=False,
                                            chunk_bytes=chunk_bytes)
    assert none is None and torch.equal(loss2, loss_sum)


def test_lm_head_ignored_rows_never_reach_head():
    # NaN in every ignored row: any of them reaching the head would poison the loss and the gradient
    g = gen(12)
    h = randn(7, 4, dtype=torch.float32, g=g)
    W = randn(9, 4, dtype=torch.float32, g=g)
    t = torch.tensor([-100, 1, -100, 3, 4, -100, 8])
    ref = F.cross_entropy(h @ W.t(), t, reduction="sum")
    h[t == -100] = float("nan")
    loss, gh = ops.lm_head_cross_entropy(h, W, t, 4.0, chunk_size=3, chunk_bytes=4 * 3 * 2)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert torch.isfinite(gh).all() and torch.all(gh[t == -100] == 0)
    # everything ignored: zero loss, zero grad, finite
    loss0, gh0 = ops.lm_head_cross_entropy(h, W, torch.full((7,), -100), 1.0)
    assert loss0.item() == 0.0 and torch.all(gh0 == 0)


# ----------------------------------------------------------------------------- bf16 smoke


def test_bf16_smoke():
    bf = torch.bfloat16
    g = gen(13)
    B, Hq, Hkv, T, D, d, F_, r, V = 2, 4, 2, 9, 8, 16, 24, 2, 11

    def both(*shape, scale=1.0):
        x = randn(*shape, dtype=torch.float32, g=g, scale=scale)
        return x, x.to(bf)

    def check(a_bf, a_32, tol=3e-2):
        assert a_bf.dtype == bf, a_bf.dtype
        assert torch.isfinite(a_bf.float()).all()
        assert relative_error(a_bf.float(), a_32) <= tol, relative_error(a_bf.float(), a_32)

    # rmsnorm
    x32, xbf = both(B, T, d)
    w32, wbf = both(d)
    gy32, gybf = both(B, T, d)
    check(ops.rmsnorm_forward(xbf, wbf, 1e-6), ops.rmsnorm_forward(x32, w32, 1e-6))
    check(ops.rmsnorm_backward(gybf, xbf, wbf, 1e-6), ops.rmsnorm_backward(gy32, x32, w32, 1e-6))
    # rope
    q32, qbf = both(B, Hq, T, D)
    cos, sin = ops.rope_cos_sin(torch.arange(T), D, 10000.0)
    check(ops.rope_forward(qbf, cos, sin), ops.rope_forward(q32, cos, sin))
    check(ops.rope_backward(qbf, cos, sin), ops.rope_backward(q32, cos, sin))
    # swiglu
    ga32, gabf = both(B, T, F_, scale=2.0)
    up32, upbf = both(B, T, F_)
    gm32, gmbf = both(B, T, F_)
    check(ops.swiglu_forward(gabf, upbf), ops.swiglu_forward(ga32, up32))
    for a, b in zip(ops.swiglu_backward(gmbf, gabf, upbf), ops.swiglu_backward(gm32, ga32, up32)):
        check(a, b)
    # lora linear (bf16 base and bf16 LoRA weights)
    W32, Wbf = both(F_, d)
    A32, Abf = both(r, d)
    B32, Bbf = both(F_, r)
    check(ops.lora_linear_forward(xbf, Wbf, None, Abf, Bbf, 2.0), ops.lora_linear_forward(x32, W32, None, A32, B32, 2.0))
    for a, b in zip(
        ops.lora_linear_backward(gmbf, xbf, Wbf, Abf, Bbf, 2.0), ops.lora_linear_backward(gm32, x32, W32, A32, B32, 2.0)
    ):
        check(a, b)
    # attention with padding
    k32, kbf = both(B, Hkv, T, D)
    v32, vbf = both(B, Hkv, T, D)
    go32, gobf = both(B, Hq, T, D)
    km = make_mask(B, T, "both")
    o32, lse32 = ops.attention_forward(q32, k32, v32, km, block_size=4)
    obf, lsebf = ops.attention_forward(qbf, kbf, vbf, km, block_size=4)
    check(obf, o32)
    assert lsebf.dtype == torch.float32 and relative_error(lsebf, lse32) <= 3e-2
    check(ops.attention_reference(qbf, kbf, vbf, km), o32)
    for a, b in zip(
        ops.attention_backward(gobf, qbf, kbf, vbf, obf, lsebf, km, block_size=4),
        ops.attention_backward(go32, q32, k32, v32, o32, lse32, km, block_size=4),
    ):
        check(a, b)
    # lm head + CE
    h32, hbf = both(10, d)
    E32, Ebf = both(V, d)
    t = torch.randint(0, V, (10,), generator=g)
    t[3] = -100
    l32, g32 = ops.lm_head_cross_entropy(h32, E32, t, 9.0, chunk_size=4)
    lbf, gbf = ops.lm_head_cross_entropy(hbf, Ebf, t, 9.0, chunk_size=4)
    assert lbf.dtype == torch.float32 and abs(lbf.item() - l32.item()) <= 3e-2 * abs(l32.item())
    check(gbf, g32)


@pytest.mark.parametrize("window,T,bs,kind", [(1, 9, 4, "none"), (3, 9, 4, "left"), (3, 9, 2, "right"),
                                              (4, 10, 3, "both"), (9, 9, 5, "left"), (20, 9, 4, "none"),
                                              (2, 7, 7, "all")])
def test_sliding_window_attention_forward_backward(window, T, bs, kind):
    """Sliding-window layers: the blockwise forward and backward against a reference masked by the loops of
    brute_visibility, fp64; a window shorter than T must change the result."""
    B, Hq, Hkv, D = 2, 4, 2, 4
    q, k, v, go = attn_inputs(B, Hq, Hkv, T, D, seed=3)
    km = None if kind == "none" else make_mask(B, T, kind)
    vis = brute_visibility(T, km if km is not None else torch.ones(B, T, dtype=torch.bool), window)[:, None]
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    G = Hq // Hkv
    S = q @ k.repeat_interleave(G, 1).transpose(-1, -2) / math.sqrt(D)
    o_ref = torch.softmax(S.masked_fill(~vis, float("-inf")), -1) @ v.repeat_interleave(G, 1)
    refs = torch.autograd.grad(o_ref, (q, k, v), go)
    assert_close(ops.attention_reference(q, k, v, km, window=window).detach(), o_ref.detach(), 1e-12)
    with torch.no_grad():
        o, lse = ops.attention_forward(q, k, v, km, block_size=bs, window=window)
        grads = ops.attention_backward(go, q, k, v, o, lse, km, block_size=bs, window=window)
        full, _ = ops.attention_forward(q, k, v, km, block_size=bs)
    assert_close(o, o_ref.detach(), 1e-12)
    if window == 1:  # one visible key per row: softmax is constant, so gq and gk vanish
        assert max(float(t.abs().max()) for t in (*grads[:2], *refs[:2])) < 1e-12
        assert_close(grads[2], refs[2], 1e-10)
    else:
        for a, b in zip(grads, refs):
            assert_close(a, b, 1e-10)
    if window < T and kind != "all":
        assert relative_error(o, full) > 1e-3
