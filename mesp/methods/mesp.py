"""MeSP: Memory-efficient Structured Backpropagation (arXiv 2602.13069), with no autograd graph at all.

Forward keeps only each decoder layer's input. The loss runs the LM head on chunks of labelled tokens, so
full-vocabulary logits never exist. Backward walks the layers in reverse; for each it recomputes the layer's
forward (DecoderLayer.forward's steps, run through mesp.ops by StructuredRun) keeping a minimal set of
intermediates (Saved), then applies the hand-derived backward of every step in reverse, each op's backward from
mesp.ops as the layer's LayerSpec names it, freeing each intermediate right after its last use. Attention is recomputed block by block from
q, k and the row log-sum-exp, so no [heads, T, T] matrix is ever held. The gradients are those of autograd.

Beyond the paper, `on_layer_grads(layer_index, grads)` is called as soon as a layer's LoRA gradients exist
(after its input gradient has been computed with the old weights), so a trainer can update that layer at once
and drop its gradients: the full gradient set never coexists.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import blockwise, ops
from ..memory import stage
from ..lora import peft_key
from ..model import DecoderLayer, Linear
from ..scratch import LayerCheckpoints
from .common import LossBatch, chunked_loss


class LoraGrads:
    """Collects (gA, gB) per projection under PEFT keys."""

    def __init__(self, prefix: str):
        self.prefix, self.grads = prefix, {}

    def add(self, name: str, proj: Linear, gA, gB):
        if proj.has_lora:
            self.grads[peft_key(f"{self.prefix}.{name}.lora_A")] = gA
            self.grads[peft_key(f"{self.prefix}.{name}.lora_B")] = gB


def lora_backward(g, x, proj: Linear, need_input_grad: bool = True, h=None):
    return ops.lora_linear_backward(g, x, proj.weight, proj.lora_A, proj.lora_B, proj.scale, need_input_grad, h)


class Saved:
    """What one layer's backward reads, kept by layer_recompute (paper's symbols, mesp/ops.py's shapes):

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

    def __init__(self):
        self.q_pre = self.k_pre = self.a = self.d = None


class StructuredRun:
    """DecoderLayer.forward's steps through mesp.ops under no_grad: LoRA projections by lora_linear_forward,
    attention blockwise (attention_forward, which also gives lse). With `saved`, every intermediate the backward
    reads is kept there, the output projection is skipped (the backward starts from dL/dy, and needs only down's
    h under store-h), and forward returns None."""

    def __init__(self, rope, key_mask, attn_block: int, saved: Saved | None = None):
        self.rope, self.key_mask, self.attn_block, self.saved = rope, key_mask, attn_block, saved

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
        if self.saved is not None:
            self.saved.lse = lse
        return o

    def residual(self, y, x):
        return y.add_(x)

    def keep(self, **tensors):
        if self.saved is not None:
            for name, t in tensors.items():
                setattr(self.saved, name, t)

    def output(self, name: str, proj: Linear, m, residual, norm=None):
        if self.saved is None:
            y = self.project(name, proj, m)
            return (y if norm is None else norm(y)).add_(residual)
        if norm is not None:  # the post-MLP norm's backward reads down's output d
            self.saved.d = self.project(name, proj, m)
        elif self.saved.h is not None and proj.has_lora:  # store-h: down's output is not needed, only its h
            A = proj.lora_A
            self.saved.h[name] = torch.matmul(m.to(A.dtype), A.t())
        return None


def layer_forward(layer: DecoderLayer, x, rope, key_mask, attn_block: int = 128):
    """One decoder layer's output y [B, T, d] through mesp.ops, keeping nothing."""
    return layer(x, StructuredRun(rope, key_mask, attn_block))


def layer_recompute(layer: DecoderLayer, x, rope, key_mask, attn_block: int = 128, store_h: bool = False) -> Saved:
    """One decoder layer's forward again, keeping the Saved intermediates its backward reads (not y). store_h
    also keeps every LoRA h = x A^T instead of letting the backward recompute it: the paper's ablation, costing
    memory."""
    saved = Saved()
    saved.h = {} if store_h else None
    layer(x, StructuredRun(rope, key_mask, attn_block, saved))
    return saved


def layer_backward(layer: DecoderLayer, x, g, rope, key_mask, grads: LoraGrads, need_input_grad=True,
                   attn_block: int = 128, store_h: bool = False):
    """Gradient of one decoder layer: DecoderLayer.forward's steps in reverse, each by its mesp.ops backward.
    x: the layer's input [B, T, d]; g: dL/d(output) [B, T, d]; rope: the layer's (cos, sin) or None.

    Returns dL/dx (or None). Peak working set: x and the Saved intermediates of this layer only, each freed
    after its last use."""
    attn, mlp, spec = layer.self_attn, layer.mlp, layer.spec
    B, T, _ = x.shape
    Hq, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    s = layer_recompute(layer, x, rope, key_mask, attn_block, store_h)
    n1, q_pre, k_pre, q, k, v, o, lse, o_flat, a, h1, n2, G, U, M, d = (
        s.n1, s.q_pre, s.k_pre, s.q, s.k, s.v, s.o, s.lse, s.o_flat, s.a, s.h1, s.n2, s.G, s.U, s.M, s.d)
    hs = s.h or {}
    del s

    # ---- MLP --------------------------------------------------------------------------------------------
    gd = layer.post_feedforward_layernorm.backward(g, d) if spec.sandwich_norms else g  # y = h1 + norm(d)
    del d
    gM, gA, gB = lora_backward(gd, M, mlp.down_proj, h=hs.pop("down_proj", None))
    del gd
    grads.add("mlp.down_proj", mlp.down_proj, gA, gB)
    del M
    gG, gU = spec.activation.backward(gM, G, U)
    del gM, G, U
    gn2, gA, gB = lora_backward(gG, n2, mlp.gate_proj, h=hs.pop("gate_proj", None))
    grads.add("mlp.gate_proj", mlp.gate_proj, gA, gB)
    del gG
    gn2_up, gA, gB = lora_backward(gU, n2, mlp.up_proj, h=hs.pop("up_proj", None))
    grads.add("mlp.up_proj", mlp.up_proj, gA, gB)
    gn2.add_(gn2_up)
    del gU, gn2_up, n2
    gh1 = layer.mlp_norm.backward(gn2, h1)
    gh1.add_(g)  # residual: h1 feeds both the MLP branch and the output
    del gn2, h1

    # ---- attention --------------------------------------------------------------------------------------
    ga = layer.post_attention_layernorm.backward(gh1, a) if spec.sandwich_norms else gh1  # h1 = x + norm(a)
    del a
    go_flat, gA, gB = lora_backward(ga, o_flat, attn.o_proj, h=hs.pop("o_proj", None))
    del ga
    grads.add("self_attn.o_proj", attn.o_proj, gA, gB)
    del o_flat
    go = go_flat.view(B, T, Hq, D).transpose(1, 2)
    gq, gk, gv = blockwise.attention_backward(go, q, k, v, o, lse, key_mask, scale=spec.attention.scale,
                                        block_size=attn_block, window=spec.attention.window)
    del go, go_flat, q, k, v, o, lse
    gq, gk = unrotate(gq, rope), unrotate(gk, rope)
    if spec.qk_norm:  # the norms' weights are frozen: their input gradients only
        gq, gk = attn.q_norm.backward(gq, q_pre), attn.k_norm.backward(gk, k_pre)
    del q_pre, k_pre
    gq = gq.transpose(1, 2).reshape(B, T, Hq * D)
    gk = gk.transpose(1, 2).reshape(B, T, Hkv * D)
    gv = gv.transpose(1, 2).reshape(B, T, Hkv * D)
    gn1, gA, gB = lora_backward(gq, n1, attn.q_proj, need_input_grad, h=hs.pop("q_proj", None))
    grads.add("self_attn.q_proj", attn.q_proj, gA, gB)
    del gq
    for name, proj, gp, h in (("self_attn.k_proj", attn.k_proj, gk, hs.pop("k_proj", None)),
                              ("self_attn.v_proj", attn.v_proj, gv, hs.pop("v_proj", None))):
        gx_part, gA, gB = lora_backward(gp, n1, proj, need_input_grad, h=h)
        grads.add(name, proj, gA, gB)
        if need_input_grad:
            gn1.add_(gx_part)
        del gx_part
    del gk, gv, n1
    if not need_input_grad:
        return None
    gx = layer.input_layernorm.backward(gn1, x)
    gx.add_(gh1)
    return gx


def unrotate(g, rope):
    """Backward of model.rotate: the inverse rotation of g [B, H, T, hd], or g itself without RoPE."""
    return g if rope is None else ops.rope_backward(g, *rope)


def gradients(model, batch: LossBatch, loss_chunk: int | None = None, attn_block: int = 128,
              on_layer_grads: Callable[[int, dict], None] | None = None, store_h: bool = False,
              offload_checkpoints=None):
    """Loss and PEFT-keyed LoRA gradients, exactly as autograd computes them, without autograd.
    offload_checkpoints: a directory for the scratch file that then holds the layer inputs (mesp.scratch)."""
    layers = model.model.layers
    T = batch.input_ids.shape[1]
    key_mask = batch.key_mask
    with torch.no_grad(), stage("forward"):
        rope = model.rope(torch.arange(T, device=model.device))
        x = model.embed(batch.input_ids)
    # the only activations kept across layers: one [B, T, d] per layer
    with LayerCheckpoints(x, len(layers), offload_checkpoints) as checkpoints:
        with torch.no_grad(), stage("forward"):
            for i, layer in enumerate(layers):
                checkpoints.put(i, x)
                x = layer_forward(layer, x, rope[i], key_mask, attn_block)

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
                                   attn_block=attn_block, store_h=store_h)
                del x
                if on_layer_grads is not None:
                    on_layer_grads(i, collected.grads)
                else:
                    all_grads.update(collected.grads)
    return loss, all_grads
