"""MeSP: Memory-efficient Structured Backpropagation (arXiv 2602.13069), with no autograd graph at all.

Forward keeps only each decoder layer's input. The loss runs the LM head on chunks of labelled tokens, so
full-vocabulary logits never exist. Backward walks the layers in reverse; for each it recomputes the layer's
forward (DecoderLayer's steps, run through mesp.ops by StructuredRun) keeping a minimal set of intermediates
(Saved), then applies the hand-derived backward of every step in reverse, each op's backward from mesp.ops as
the layer's LayerSpec names it, freeing each intermediate right after its last use. Attention is recomputed
block by block from q, k and the row log-sum-exp, so no [heads, T, T] matrix is ever held. The gradients are
those of autograd.

Token chunks. Everything in a layer but attention is token-wise (DecoderLayer.attention_inputs and
after_attention), so those steps, forward and backward, run over chunks of `token_chunk` positions of every
batch row (B * token_chunk tokens at a time); attention runs blockwise over the whole sequence. Rule
(token_chunks): None = the whole sequence up to WHOLE_UP_TO positions (short sequences run exactly as without
chunks), chunks of DEFAULT_TOKEN_CHUNK positions beyond; 0 or a value >= T = the whole sequence. LoRA
gradients are summed over the chunks.

What lives at a layer's backward peak (B rows, T positions, c = the chunk's positions, c = T unchunked;
d hidden, F intermediate, Hq/Hkv heads of D; all in the compute dtype unless said):
- whole sequence, for the whole layer: the layer input x [B, T, d] (its checkpoint) and g = dL/dy [B, T, d],
  whose storage becomes dL/dx (written in place, chunk by chunk); q [B, Hq, T, D]; k, v [B, Hkv, T, D];
  lse [B, Hq, T] (fp32); with q/k norms also q_pre, k_pre (q and k before their norms).
- per chunk, one chunk at a time, while its MLP and o_proj are differentiated: n2, h1 [B, c, d], o_flat
  [B, c, Hq*D], G, U, M [B, c, F] (with sandwich norms also a, d [B, c, d]) and their gradients gM, gG, gU
  [B, c, F] (at most three [B, c, F] at once); beside them o [B, Hq, T, D] (whole), and go [B, Hq, T, D] and
  delta = rowsum(go * o) [B, Hq, T] (fp32), both filled chunk by chunk. o is freed after the last chunk.
- attention's backward: go, gq [B, Hq, T, D], gk, gv [B, Hkv, T, D], delta, and one score block
  [B, Hq, attn_block, T] in fp32 twice (P and its gradient), beside x, g, q, k, v, lse; the score blocks'
  products also expand k or v to [B, Hq, attn_block or T, D] while they run (k/v broadcast over a group's
  heads). attention_block's default keeps one score block within SCORE_BLOCK_BYTES.
- then per chunk: n1 [B, c, d] (recomputed by the input norm), the chunk's q/k/v gradients reshaped
  [B, c, *], and dL/dn1 [B, c, d].
Unchunked (one chunk), the recompute keeps n1 and the other per-chunk tensors for all T at once, as the paper.
The forward of a layer holds x, y [B, T, d], q, k, v, o whole and one chunk's MLP intermediates.

keep_layers. A layer in keep_layers keeps its forward's Saved intermediates (LayerKept: the whole-sequence
attention tensors plus every chunk's token-wise ones, n1 included) until its backward, which then recomputes
no product: the speed lever, costing per kept layer all of the per-chunk tensors above for all T at once.
Two of them are not kept (KEPT_SLOTS): o, which the backward reads only through delta, taken from o_flat (the
same values, heads merged); and M = act(G) ⊙ U, recomputed from G and U by one elementwise step (a quarter less
memory per kept layer at the cost of no product).

Beyond the paper, `on_layer_grads(layer_index, grads)` is called as soon as a layer's LoRA gradients exist
(after its input gradient has been computed with the old weights), so a trainer can update that layer at once
and drop its gradients: the full gradient set never coexists.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import blockwise, ops
from ..errors import MespError
from ..memory import stage
from ..lora import peft_key
from ..model import DecoderLayer, Linear
from ..scratch import LayerCheckpoints
from .common import LossBatch, chunked_loss

# token_chunk None: sequences up to WHOLE_UP_TO positions run whole, longer ones in chunks of DEFAULT_TOKEN_CHUNK
# (a chunk's MLP backward holds about six [B, chunk, F] tensors at once; 128 rows keep them a few MiB for
# sub-billion models while each product still has enough rows to run at full speed)
WHOLE_UP_TO = 256
DEFAULT_TOKEN_CHUNK = 128
# attn_block None: DEFAULT_ATTN_BLOCK query rows, fewer at long T so one score block stays within SCORE_BLOCK_BYTES
DEFAULT_ATTN_BLOCK = 128
SCORE_BLOCK_BYTES = 8 << 20
MIN_ATTN_BLOCK = 16


def token_chunks(T: int, token_chunk: int | None = None) -> list[tuple[int, int]]:
    """The position ranges [t0, t1) the token-wise steps run over (the module docstring states the rule)."""
    if token_chunk is None:
        token_chunk = DEFAULT_TOKEN_CHUNK if T > WHOLE_UP_TO else 0
    if isinstance(token_chunk, bool) or not isinstance(token_chunk, int) or token_chunk < 0:
        raise MespError(f"token_chunk: expected a whole number >= 0 (0 = no chunks), got {token_chunk!r}")
    if token_chunk == 0 or token_chunk >= T:
        return [(0, T)]
    return [(t0, min(t0 + token_chunk, T)) for t0 in range(0, T, token_chunk)]


def attention_block(attn_block: int | None, B: int, heads: int, T: int, dtype: torch.dtype) -> int:
    """Query rows per block of the blockwise attention: attn_block as given; None = DEFAULT_ATTN_BLOCK rows, or
    fewer (not under MIN_ATTN_BLOCK) where one score block [B, heads, rows, T] in the accumulation dtype would
    pass SCORE_BLOCK_BYTES: attention's backward holds two such blocks (P and its gradient), which would
    otherwise grow with T."""
    if attn_block is not None:
        if isinstance(attn_block, bool) or not isinstance(attn_block, int) or attn_block < 1:
            raise MespError(f"attn_block: expected a positive whole number, got {attn_block!r}")
        return attn_block
    row_bytes = B * heads * T * torch.finfo(ops.acc_dtype(dtype)).bits // 8
    return max(MIN_ATTN_BLOCK, min(DEFAULT_ATTN_BLOCK, SCORE_BLOCK_BYTES // row_bytes))


def check_keep_layers(keep_layers, n_layers: int) -> frozenset[int]:
    """keep_layers as a frozenset of layer indices (None = none), every index a layer of the model."""
    if keep_layers is None:
        return frozenset()
    try:
        kept = frozenset(keep_layers)
    except TypeError as e:
        raise MespError(f"keep_layers: expected a set of layer indices, got {keep_layers!r}") from e
    bad = sorted(i for i in kept if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layers)
    if bad:
        raise MespError(f"keep_layers: {bad[0]!r} is not a layer index of this model (0..{n_layers - 1})")
    return kept


def rope_rows(rope, t0: int, t1: int):
    """The (cos, sin) rows of positions [t0, t1), or None for a layer without RoPE."""
    return None if rope is None else tuple(t[..., t0:t1, :] for t in rope)


def place(whole, part, t0: int, t1: int, T: int, dim: int):
    """Write `part` (positions t0..t1 along `dim`) into `whole`, made on the first chunk; a part that already
    covers all T positions is returned as is (no copy)."""
    if whole is None:
        if t1 - t0 == T:
            return part
        shape = list(part.shape)
        shape[dim] = T
        whole = part.new_empty(shape)
    whole.narrow(dim, t0, t1 - t0).copy_(part)
    return whole


class LoraGrads:
    """Collects (gA, gB) per projection under PEFT keys, summing the parts of one layer's token chunks."""

    def __init__(self, prefix: str):
        self.prefix, self.grads = prefix, {}

    def add(self, name: str, proj: Linear, gA, gB):
        if proj.has_lora:
            for part, grad in (("lora_A", gA), ("lora_B", gB)):
                key = peft_key(f"{self.prefix}.{name}.{part}")
                if key in self.grads:
                    self.grads[key].add_(grad)
                else:
                    self.grads[key] = grad

    def backward(self, name: str, proj: Linear, g, x, hs: dict, need_input_grad: bool = True):
        """One LoRA projection's backward (ops.lora_linear_backward; its stored h taken from `hs` under store-h):
        its (gA, gB) added under `name` ("mlp.down_proj"), dL/d(input) returned (None without need_input_grad)."""
        h = hs.pop(name.rsplit(".", 1)[-1], None)
        gx, gA, gB = ops.lora_linear_backward(g, x, proj.weight, proj.lora_A, proj.lora_B, proj.scale,
                                              need_input_grad, h)
        self.add(name, proj, gA, gB)
        return gx


class Saved:
    """What one layer's backward reads, kept by layer_recompute (paper's symbols, mesp/ops.py's shapes; T is the
    positions of the chunk the Saved holds, all of them for attention's tensors):

    n1      rmsnorm(x; γ1), input of q/k/v                        [B, T, d]
    q_pre,  q, k per head before their norms (q/k-norm families  [B, Hq, T, D], [B, Hkv, T, D]
    k_pre   only; otherwise None)
    q, k    q, k after RoPE, per head                             [B, Hq, T, D], [B, Hkv, T, D]
    v       v per head                                            [B, Hkv, T, D]
    o       P v per head (P = softmax(q kᵀ/sqrt(D) + mask))       [B, Hq, T, D]
    lse     row log-sum-exp of the masked scores: P is rebuilt    [B, Hq, T]
            block by block from q, k and lse, never kept
    o_flat  o with heads merged, o_proj's input                   [B, T, Hq*D]
    a       o_proj(o_flat) before its norm (sandwich norms only)  [B, T, d]
    h1      x + o_proj(o) (normed with sandwich norms), the       [B, T, d]
            residual stream after attention
    n2      norm(h1), input of gate/up                            [B, T, d]
    G, U    gate(n2), up(n2)                                      [B, T, F]
    M       act(G) ⊙ U (the activation's output), down's input    [B, T, F]
    d       down(M) before its norm (sandwich norms only)         [B, T, d]
    h       LoRA h = x Aᵀ per projection name (store-h ablation   {name: [B, T, r]} or None
            only; otherwise the backward recomputes it)
    """
    __slots__ = ("n1", "q_pre", "k_pre", "q", "k", "v", "o", "lse", "o_flat", "a", "h1", "n2", "G", "U", "M", "d",
                 "h")

    def __init__(self, store_h: bool = False):
        for name in self.__slots__:
            setattr(self, name, None)
        self.h = {} if store_h else None


# what a kept layer's forward keeps (the module docstring says why o and M are not)
KEPT_SLOTS = frozenset(Saved.__slots__) - {"o", "M"}


class LayerKept:
    """A layer's Saved intermediates from its forward (keep_layers), consumed by its backward: `whole` holds
    attention's whole-sequence tensors (q, k, v, o, lse), `parts[i]` the token-wise ones of chunk `chunks[i]`
    (with one chunk, both are the same Saved)."""

    def __init__(self, chunks: list[tuple[int, int]], store_h: bool = False):
        self.chunks = chunks
        self.parts = [Saved(store_h) for _ in chunks]
        self.whole = self.parts[0] if len(chunks) == 1 else Saved()


class StructuredRun:
    """DecoderLayer's steps through mesp.ops under no_grad: LoRA projections by lora_linear_forward, attention
    blockwise (attention_forward, which also gives lse). With `saved`, the intermediates the backward reads are
    kept there (only those named in `keep_only`, when given); without `output`, the output projection is then
    skipped (the backward starts from dL/dy, and needs only down's h under store-h) and the steps return None.
    `rope` covers the positions the run is given."""

    def __init__(self, rope, key_mask, attn_block: int, saved: Saved | None = None, output: bool = False,
                 keep_only: frozenset[str] | None = None):
        self.rope, self.key_mask, self.attn_block, self.saved = rope, key_mask, attn_block, saved
        self.want_output, self.keep_only = saved is None or output, keep_only

    def project(self, name: str, proj: Linear, x):
        stored_h = None if self.saved is None else self.saved.h
        if stored_h is None:
            return ops.lora_linear_forward(x, proj.weight, proj.bias, proj.lora_A, proj.lora_B, proj.scale)
        y, stored_h[name] = ops.lora_linear_forward(x, proj.weight, proj.bias, proj.lora_A, proj.lora_B, proj.scale,
                                                    return_h=True)
        return y

    def attend(self, q, k, v, kind):
        o, lse = blockwise.attention_forward(q, k, v, self.key_mask, scale=kind.scale, block_size=self.attn_block,
                                             window=kind.window)
        self.keep(lse=lse)
        return o

    def residual(self, y, x):
        return y.add_(x)

    def keep(self, **tensors):
        if self.saved is not None:
            for name, t in tensors.items():
                if self.keep_only is None or name in self.keep_only:
                    setattr(self.saved, name, t)

    def output(self, name: str, proj: Linear, m, residual, norm=None):
        if self.want_output:
            y = self.project(name, proj, m)
            if norm is not None:
                self.keep(d=y)  # the post-MLP norm's backward reads down's output d
            return (y if norm is None else norm(y)).add_(residual)
        if norm is not None:
            self.saved.d = self.project(name, proj, m)
        elif self.saved.h is not None and proj.has_lora:  # store-h: down's output is not needed, only its h
            A = proj.lora_A
            self.saved.h[name] = torch.matmul(m.to(A.dtype), A.t())
        return None


def chunked_attention(layer: DecoderLayer, x, rope, key_mask, attn_block: int, chunks, parts: list[Saved] | None,
                      whole: Saved | None, keep_only: frozenset[str] | None = None,
                      whole_keep_only: frozenset[str] | None = None):
    """attention_inputs over each chunk (parts[i] keeps chunk i's intermediates, those in keep_only when given),
    then attention over the whole sequence (`whole` keeps q, k, v, o, lse, those in whole_keep_only when given):
    the layer's o [B, Hq, T, D]."""
    T = x.shape[1]
    q = k = v = None
    for i, (t0, t1) in enumerate(chunks):
        run = StructuredRun(rope_rows(rope, t0, t1), key_mask, attn_block, None if parts is None else parts[i],
                            keep_only=keep_only)
        qc, kc, vc = layer.attention_inputs(x[:, t0:t1], run)
        q, k, v = (place(w, p, t0, t1, T, 2) for w, p in ((q, qc), (k, kc), (v, vc)))
        del qc, kc, vc
    run = StructuredRun(rope, key_mask, attn_block, whole, keep_only=whole_keep_only)
    o = run.attend(q, k, v, layer.spec.attention)
    run.keep(q=q, k=k, v=v, o=o)
    return o


def layer_forward(layer: DecoderLayer, x, rope, key_mask, attn_block: int = 128, token_chunk: int | None = None,
                  kept: LayerKept | None = None):
    """One decoder layer's output y [B, T, d] through mesp.ops, its token-wise steps over token chunks; keeps
    nothing, or with `kept` (made for token_chunks(T, token_chunk)) everything its backward reads."""
    chunks = token_chunks(x.shape[1], token_chunk) if kept is None else kept.chunks
    parts, whole = (None, None) if kept is None else (kept.parts, kept.whole)
    keep_only = None if kept is None else KEPT_SLOTS
    if len(chunks) == 1:
        return layer(x, StructuredRun(rope, key_mask, attn_block, whole, output=True, keep_only=keep_only))
    o = chunked_attention(layer, x, rope, key_mask, attn_block, chunks, parts, whole, keep_only, keep_only)
    y = None
    for i, (t0, t1) in enumerate(chunks):
        run = StructuredRun(rope_rows(rope, t0, t1), key_mask, attn_block, None if parts is None else parts[i],
                            output=True, keep_only=keep_only)
        y = place(y, layer.after_attention(o[:, :, t0:t1], x[:, t0:t1], run), t0, t1, x.shape[1], 1)
    return y


def layer_recompute(layer: DecoderLayer, x, rope, key_mask, attn_block: int = 128, store_h: bool = False) -> Saved:
    """One decoder layer's forward again over the whole sequence, keeping the Saved intermediates its backward
    reads (not y). store_h also keeps every LoRA h = x A^T instead of letting the backward recompute it: the
    paper's ablation, costing memory."""
    saved = Saved(store_h)
    layer(x, StructuredRun(rope, key_mask, attn_block, saved))
    return saved


def layer_backward(layer: DecoderLayer, x, g, rope, key_mask, grads: LoraGrads, need_input_grad=True,
                   attn_block: int = 128, store_h: bool = False, token_chunk: int | None = None,
                   kept: LayerKept | None = None):
    """Gradient of one decoder layer: DecoderLayer's steps in reverse, each by its mesp.ops backward, the
    token-wise ones chunk by chunk. x: the layer's input [B, T, d]; g: dL/d(output) [B, T, d], consumed: its
    storage becomes dL/dx; rope: the layer's (cos, sin) or None; kept: the layer's forward intermediates
    (keep_layers), else they are recomputed.

    Returns dL/dx (or None). The module docstring lists what lives at its peak."""
    attn, mlp, spec = layer.self_attn, layer.mlp, layer.spec
    B, T, _ = x.shape
    Hq, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    if kept is not None:
        chunks, parts, whole = kept.chunks, kept.parts, kept.whole
    else:
        chunks = token_chunks(T, token_chunk)
        if len(chunks) == 1:
            whole = layer_recompute(layer, x, rope, key_mask, attn_block, store_h)
            parts = [whole]
        else:  # attention's inputs now, the rest chunk by chunk below; n1 is recomputed where it is needed
            parts, whole = [Saved(store_h) for _ in chunks], Saved()
            chunked_attention(layer, x, rope, key_mask, attn_block, chunks, parts, whole,
                              keep_only=frozenset(("q_pre", "k_pre")))
    recompute_chunks = kept is None and len(chunks) > 1

    # ---- MLP and o_proj, chunk by chunk; dL/dh1 is written over g ---------------------------------------
    go = delta = None
    for s, (t0, t1) in zip(parts, chunks):
        if recompute_chunks:
            layer.after_attention(whole.o[:, :, t0:t1], x[:, t0:t1],
                                  StructuredRun(rope_rows(rope, t0, t1), key_mask, attn_block, s))
        hs = s.h or {}
        gy = g[:, t0:t1]
        gd = layer.post_feedforward_layernorm.backward(gy, s.d) if spec.sandwich_norms else gy  # y = h1 + norm(d)
        s.d = None
        M = s.M if s.M is not None else spec.activation.forward(s.G, s.U)  # a kept layer recomputes M
        s.M = None
        gM = grads.backward("mlp.down_proj", mlp.down_proj, gd, M, hs)
        del gd, M
        gG, gU = spec.activation.backward(gM, s.G, s.U)
        del gM
        s.G = s.U = None
        gn2 = grads.backward("mlp.gate_proj", mlp.gate_proj, gG, s.n2, hs)
        del gG
        gn2_up = grads.backward("mlp.up_proj", mlp.up_proj, gU, s.n2, hs)
        gn2.add_(gn2_up)
        del gU, gn2_up
        s.n2 = None
        gy.add_(layer.mlp_norm.backward(gn2, s.h1))  # residual: h1 feeds both the MLP branch and the output
        del gn2
        s.h1 = None
        gh1 = gy
        ga = layer.post_attention_layernorm.backward(gh1, s.a) if spec.sandwich_norms else gh1  # h1 = x + norm(a)
        s.a = None
        go_flat = grads.backward("self_attn.o_proj", attn.o_proj, ga, s.o_flat, hs)
        del ga
        go_c = go_flat.view(B, t1 - t0, Hq, D).transpose(1, 2)
        del go_flat
        o_c = s.o_flat.view(B, t1 - t0, Hq, D).transpose(1, 2)  # o's values, as o_flat holds them
        s.o_flat = None
        delta = place(delta, blockwise.attention_delta(go_c, o_c), t0, t1, T, 2)
        del o_c
        go = place(go, go_c, t0, t1, T, 2)
        del go_c
    whole.o = None  # attention's backward reads o only through delta (from o_flat)

    # ---- attention, over the whole sequence -------------------------------------------------------------
    gq, gk, gv = blockwise.attention_backward(go, whole.q, whole.k, whole.v, None, whole.lse, key_mask,
                                              scale=spec.attention.scale, block_size=attn_block,
                                              window=spec.attention.window, delta=delta)
    del go, delta
    whole.q = whole.k = whole.v = whole.lse = None

    # ---- q/k/v projections and the input norm, chunk by chunk -------------------------------------------
    for s, (t0, t1) in zip(parts, chunks):
        hs = s.h or {}
        c, rows = t1 - t0, rope_rows(rope, t0, t1)
        gq_c, gk_c = unrotate(gq[:, :, t0:t1], rows), unrotate(gk[:, :, t0:t1], rows)
        if spec.qk_norm:  # the norms' weights are frozen: their input gradients only
            gq_c, gk_c = attn.q_norm.backward(gq_c, s.q_pre), attn.k_norm.backward(gk_c, s.k_pre)
        s.q_pre = s.k_pre = None
        gq_c = gq_c.transpose(1, 2).reshape(B, c, Hq * D)
        gk_c = gk_c.transpose(1, 2).reshape(B, c, Hkv * D)
        gv_c = gv[:, :, t0:t1].transpose(1, 2).reshape(B, c, Hkv * D)
        x_c = x[:, t0:t1]
        n1 = s.n1 if s.n1 is not None else layer.input_layernorm(x_c)
        s.n1 = None
        gn1 = grads.backward("self_attn.q_proj", attn.q_proj, gq_c, n1, hs, need_input_grad)
        del gq_c
        for name, proj, gp in (("self_attn.k_proj", attn.k_proj, gk_c), ("self_attn.v_proj", attn.v_proj, gv_c)):
            gx_part = grads.backward(name, proj, gp, n1, hs, need_input_grad)
            if need_input_grad:
                gn1.add_(gx_part)
            del gx_part
        del gk_c, gv_c, n1
        if need_input_grad:
            g[:, t0:t1].add_(layer.input_layernorm.backward(gn1, x_c))
        del gn1
    return g if need_input_grad else None


def unrotate(g, rope):
    """Backward of model.rotate: the inverse rotation of g [B, H, T, hd], or g itself without RoPE."""
    return g if rope is None else ops.rope_backward(g, *rope)


def gradients(model, batch: LossBatch, loss_chunk: int | None = None, attn_block: int | None = None,
              on_layer_grads: Callable[[int, dict], None] | None = None, store_h: bool = False,
              offload_checkpoints=None, token_chunk: int | None = None, keep_layers=None):
    """Loss and PEFT-keyed LoRA gradients, exactly as autograd computes them, without autograd.
    offload_checkpoints: a directory for the scratch file that then holds the layer inputs (mesp.scratch).
    attn_block: query rows per attention block (attention_block's rule; None = the default). token_chunk:
    positions per token chunk (token_chunks' rule; None = the default). keep_layers: indices of the layers whose
    forward keeps its intermediates for the backward instead of it recomputing them (None = none)."""
    layers = model.model.layers
    B, T = batch.input_ids.shape
    key_mask = batch.key_mask
    attn_block = attention_block(attn_block, B, model.config.num_attention_heads, T, model.dtype)
    chunks = token_chunks(T, token_chunk)
    keep_layers = check_keep_layers(keep_layers, len(layers))
    with torch.no_grad(), stage("forward"):
        rope = model.rope(torch.arange(T, device=model.device))
        x = model.embed(batch.input_ids)
    # the only activations kept across layers: one [B, T, d] per layer (and the kept layers' intermediates)
    kept = {i: LayerKept(chunks, store_h) for i in keep_layers}
    with LayerCheckpoints(x, len(layers), offload_checkpoints) as checkpoints:
        with torch.no_grad(), stage("forward"):
            for i, layer in enumerate(layers):
                checkpoints.put(i, x)
                x = layer_forward(layer, x, rope[i], key_mask, attn_block, token_chunk, kept.get(i))

        with torch.no_grad(), stage("loss"):
            norm = model.model.norm
            loss, g_norm = chunked_loss(norm(x), model, batch, loss_chunk)
            g = norm.backward(g_norm, x)
            del g_norm, x

        all_grads = {}
        with torch.no_grad(), stage("backward"):
            for i in reversed(range(len(layers))):
                collected = LoraGrads(f"model.layers.{i}")
                x = checkpoints.pop(i)
                g = layer_backward(layers[i], x, g, rope[i], key_mask, collected, need_input_grad=i > 0,
                                   attn_block=attn_block, store_h=store_h, token_chunk=token_chunk,
                                   kept=kept.pop(i, None))
                del x
                if on_layer_grads is not None:
                    on_layer_grads(i, collected.grads)
                else:
                    all_grads.update(collected.grads)
    return loss, all_grads
