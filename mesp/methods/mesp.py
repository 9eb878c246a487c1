"""MeSP: Memory-efficient Structured Backpropagation (arXiv 2602.13069), with no autograd graph at all.

Forward keeps only each decoder layer's input. The loss runs the LM head on chunks of labelled tokens, so
full-vocabulary logits never exist. Backward walks the layers in reverse; for each it recomputes the layer's
forward keeping a minimal set of intermediates, then applies the hand-derived backward of every op in
mesp.ops, freeing each intermediate right after its last use. Attention is recomputed block by block from
q, k and the row log-sum-exp, so no [heads, T, T] matrix is ever held. The gradients are those of autograd.

Beyond the paper, `on_layer_grads(layer_index, grads)` is called as soon as a layer's LoRA gradients exist
(after its input gradient has been computed with the old weights), so a trainer can update that layer at once
and drop its gradients: the full gradient set never coexists.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import ops
from ..memory import stage
from ..lora import peft_key
from ..model import DecoderLayer, Linear
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


def lora_forward(x, proj: Linear, stored_h: dict | None = None, name: str = ""):
    """The projection's output; with stored_h (the store-h ablation) h = x A^T is kept under `name`."""
    if stored_h is None:
        return ops.lora_linear_forward(x, proj.weight, proj.bias, proj.lora_A, proj.lora_B, proj.scale)
    y, stored_h[name] = ops.lora_linear_forward(x, proj.weight, proj.bias, proj.lora_A, proj.lora_B, proj.scale,
                                                return_h=True)
    return y


class Saved:
    """The intermediates of one layer's forward that its backward reads."""
    __slots__ = ("n1", "q", "k", "v", "o", "lse", "o_flat", "h1", "n2", "G", "U", "M", "h")


def layer_forward(layer: DecoderLayer, x, cos, sin, key_mask, attn_block: int = 128, keep: bool = False,
                  store_h: bool = False):
    """One decoder layer through mesp.ops. Returns y, or with keep=True the Saved intermediates instead
    (y itself is then not needed: backward starts from dL/dy). store_h (with keep) also keeps every LoRA
    h = x A^T instead of letting the backward recompute it: the paper's ablation, costing memory."""
    attn, mlp = layer.self_attn, layer.mlp
    ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
    B, T, _ = x.shape
    Hq, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    s = Saved()
    s.h = hs = {} if keep and store_h else None
    s.n1 = ops.rmsnorm_forward(x, ln1.weight, ln1.eps)
    s.q = ops.rope_forward(attn.split_heads(lora_forward(s.n1, attn.q_proj, hs, "q"), Hq), cos, sin)
    s.k = ops.rope_forward(attn.split_heads(lora_forward(s.n1, attn.k_proj, hs, "k"), Hkv), cos, sin)
    s.v = attn.split_heads(lora_forward(s.n1, attn.v_proj, hs, "v"), Hkv)
    if not keep:
        del s.n1
    s.o, s.lse = ops.attention_forward(s.q, s.k, s.v, key_mask, block_size=attn_block)
    if not keep:
        del s.q, s.k, s.v, s.lse
    s.o_flat = s.o.transpose(1, 2).reshape(B, T, Hq * D)  # o_proj's input (o itself stays for attention)
    if not keep:
        del s.o
    s.h1 = lora_forward(s.o_flat, attn.o_proj, hs, "o")
    s.h1.add_(x)
    if not keep:
        del s.o_flat
    s.n2 = ops.rmsnorm_forward(s.h1, ln2.weight, ln2.eps)
    s.G = lora_forward(s.n2, mlp.gate_proj, hs, "gate")
    s.U = lora_forward(s.n2, mlp.up_proj, hs, "up")
    if not keep:
        del s.n2
    s.M = ops.swiglu_forward(s.G, s.U)
    if keep:
        if hs is not None and mlp.down_proj.has_lora:  # down's output is not needed, only its h
            A = mlp.down_proj.lora_A
            hs["down"] = torch.matmul(s.M.to(A.dtype), A.t())
        return s
    del s.G, s.U
    y = lora_forward(s.M, mlp.down_proj)
    del s.M
    y.add_(s.h1)
    return y


def layer_backward(layer: DecoderLayer, x, g, cos, sin, key_mask, grads: LoraGrads, need_input_grad=True,
                   attn_block: int = 128, store_h: bool = False):
    """Gradient of one decoder layer. x: the layer's input [B, T, d]; g: dL/d(output) [B, T, d].

    Returns dL/dx (or None). Peak working set: x, n1, q, k, v, o, lse, h1, n2, G, U of this layer only,
    each freed after its last use."""
    attn, mlp = layer.self_attn, layer.mlp
    ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
    B, T, _ = x.shape
    Hq, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    s = layer_forward(layer, x, cos, sin, key_mask, attn_block, keep=True, store_h=store_h)
    n1, q, k, v, o, lse, o_flat, h1, n2, G, U, M = (
        s.n1, s.q, s.k, s.v, s.o, s.lse, s.o_flat, s.h1, s.n2, s.G, s.U, s.M)
    hs = s.h or {}
    del s

    # ---- MLP --------------------------------------------------------------------------------------------
    gM, gA, gB = lora_backward(g, M, mlp.down_proj, h=hs.pop("down", None))
    grads.add("mlp.down_proj", mlp.down_proj, gA, gB)
    del M
    gG, gU = ops.swiglu_backward(gM, G, U)
    del gM, G, U
    gn2, gA, gB = lora_backward(gG, n2, mlp.gate_proj, h=hs.pop("gate", None))
    grads.add("mlp.gate_proj", mlp.gate_proj, gA, gB)
    del gG
    gn2_up, gA, gB = lora_backward(gU, n2, mlp.up_proj, h=hs.pop("up", None))
    grads.add("mlp.up_proj", mlp.up_proj, gA, gB)
    gn2.add_(gn2_up)
    del gU, gn2_up, n2
    gh1 = ops.rmsnorm_backward(gn2, h1, ln2.weight, ln2.eps)
    gh1.add_(g)  # residual: h1 feeds both the MLP branch and the output
    del gn2, h1

    # ---- attention --------------------------------------------------------------------------------------
    go_flat, gA, gB = lora_backward(gh1, o_flat, attn.o_proj, h=hs.pop("o", None))
    grads.add("self_attn.o_proj", attn.o_proj, gA, gB)
    del o_flat
    go = go_flat.view(B, T, Hq, D).transpose(1, 2)
    gq, gk, gv = ops.attention_backward(go, q, k, v, o, lse, key_mask, block_size=attn_block)
    del go, go_flat, q, k, v, o, lse
    gq = ops.rope_backward(gq, cos, sin).transpose(1, 2).reshape(B, T, Hq * D)
    gk = ops.rope_backward(gk, cos, sin).transpose(1, 2).reshape(B, T, Hkv * D)
    gv = gv.transpose(1, 2).reshape(B, T, Hkv * D)
    gn1, gA, gB = lora_backward(gq, n1, attn.q_proj, need_input_grad, h=hs.pop("q", None))
    grads.add("self_attn.q_proj", attn.q_proj, gA, gB)
    del gq
    for name, proj, gp, h in (("self_attn.k_proj", attn.k_proj, gk, hs.pop("k", None)),
                              ("self_attn.v_proj", attn.v_proj, gv, hs.pop("v", None))):
        gx_part, gA, gB = lora_backward(gp, n1, proj, need_input_grad, h=h)
        grads.add(name, proj, gA, gB)
        if need_input_grad:
            gn1.add_(gx_part)
        del gx_part
    del gk, gv, n1
    if not need_input_grad:
        return None
    gx = ops.rmsnorm_backward(gn1, x, ln1.weight, ln1.eps)
    gx.add_(gh1)
    return gx


def gradients(model, batch: LossBatch, loss_chunk: int | None = None, attn_block: int = 128,
              on_layer_grads: Callable[[int, dict], None] | None = None, store_h: bool = False):
    """Loss and PEFT-keyed LoRA gradients, exactly as autograd computes them, without autograd."""
    layers = model.model.layers
    T = batch.input_ids.shape[1]
    key_mask = batch.key_mask
    with torch.no_grad(), stage("forward"):
        cos, sin = model.rope(torch.arange(T, device=model.device))
        inputs = []  # the only activations kept across layers: one [B, T, d] per layer
        x = model.embed(batch.input_ids)
        for layer in layers:
            inputs.append(x)
            x = layer_forward(layer, x, cos, sin, key_mask, attn_block)

    with torch.no_grad(), stage("loss"):
        norm = model.model.norm
        loss, g_norm = chunked_loss(norm(x), model, batch, loss_chunk)
        g = ops.rmsnorm_backward(g_norm, x, norm.weight, norm.eps)
        del g_norm, x

    all_grads = {}
    with torch.no_grad(), stage("backward"):
        for i in reversed(range(len(layers))):
            collected = LoraGrads(f"model.layers.{i}")
            x = inputs.pop()
            g = layer_backward(layers[i], x, g, cos, sin, key_mask, collected, need_input_grad=i > 0,
                               attn_block=attn_block, store_h=store_h)
            del x
            if on_layer_grads is not None:
                on_layer_grads(i, collected.grads)
            else:
                all_grads.update(collected.grads)
    return loss, all_grads
