"""One decoder-only transformer for every family in mesp.families (Qwen2/Qwen2.5, Qwen3, Llama: SmolLM2,
Llama 3.x, SmolLM3).

Each layer is built from its LayerSpec, and `DecoderLayer.forward` is the one place its steps are written; a
`LayerRun` says how they execute (here: modules under autograd, SDPA over an optional KV cache; MeSP runs the
same steps through mesp.ops). The module tree mirrors Hugging Face's (`model.layers.3.self_attn.q_proj.weight`, `lm_head.weight`), so
checkpoint names, PEFT adapter keys and merged exports need no renaming table. Base weights are frozen
buffers (or quantized weight objects, see mesp.quant), never Parameters: the only trainable tensors are
LoRA's, and the engines in mesp.methods read the weights directly to run their own backward passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import blockwise, ops
from .families import AttentionKind, LayerSpec, ModelConfig, NormKind, Projection, projections


class Linear(nn.Module):
    """A frozen projection y = x W^T (+ b), plus LoRA's scale * (x A^T) B^T once mesp.lora adds A and B."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(0), persistent=True)
        self.register_buffer("bias", torch.empty(0) if bias else None, persistent=True)
        self.lora_A: nn.Parameter | None = None  # [r, in]
        self.lora_B: nn.Parameter | None = None  # [out, r]
        self.scale = 0.0

    @property
    def has_lora(self) -> bool:
        return self.lora_A is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ops.frozen_linear(x, self.weight, self.bias)
        if self.lora_A is not None:  # in the LoRA weights' dtype, as ops.lora_linear_forward and PEFT
            lora = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scale
            y = y + lora.to(y.dtype)
        return y


class Norm(nn.Module):
    """A frozen norm of the family's kind over the last dim (weight [d])."""

    def __init__(self, dim: int, eps: float, kind: NormKind):
        super().__init__()
        self.eps, self.kind = eps, kind
        self.register_buffer("weight", torch.full((dim,), kind.init))

    def forward(self, x):
        return self.kind.forward(x, self.weight, self.eps)

    def backward(self, gy, x):
        """dL/dx from dL/dy and the norm's input x (the weight is frozen): the kind's hand-derived backward."""
        return self.kind.backward(gy, x, self.weight, self.eps)


class Embedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("weight", torch.empty(0))

    def forward(self, ids):
        """Rows of the embedding table; quantized tables dequantize only the rows asked for."""
        if isinstance(self.weight, torch.Tensor):
            return F.embedding(ids, self.weight)
        return self.weight.rows(ids)


class Attention(nn.Module):
    """The attention projections and q/k norms (HF's module tree); the steps that use them are
    DecoderLayer.forward's."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec, proj: dict[str, Projection]):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj, self.k_proj = Linear(*proj["self_attn.q_proj"]), Linear(*proj["self_attn.k_proj"])
        self.v_proj, self.o_proj = Linear(*proj["self_attn.v_proj"]), Linear(*proj["self_attn.o_proj"])
        if spec.qk_norm:  # one norm over head_dim, shared by every head
            self.q_norm = Norm(cfg.head_dim, cfg.rms_norm_eps, spec.norm)
            self.k_norm = Norm(cfg.head_dim, cfg.rms_norm_eps, spec.norm)

    def split_heads(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        """[B, T, heads*hd] -> [B, heads, T, hd]"""
        B, T, _ = t.shape
        return t.view(B, T, heads, self.head_dim).transpose(1, 2)


class MLP(nn.Module):
    """The gated MLP's projections (HF's module tree); the steps that use them are DecoderLayer.forward's."""

    def __init__(self, proj: dict[str, Projection]):
        super().__init__()
        self.gate_proj, self.up_proj = Linear(*proj["mlp.gate_proj"]), Linear(*proj["mlp.up_proj"])
        self.down_proj = Linear(*proj["mlp.down_proj"])


class DecoderLayer(nn.Module):
    """One decoder layer, built from and run as its LayerSpec (mesp.families) describes."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        proj = projections(cfg, spec)
        self.input_layernorm = Norm(cfg.hidden_size, cfg.rms_norm_eps, spec.norm)
        self.self_attn = Attention(cfg, spec, proj)
        # without sandwich norms this is the MLP's input norm; with them it normalizes the attention output
        self.post_attention_layernorm = Norm(cfg.hidden_size, cfg.rms_norm_eps, spec.norm)
        if spec.sandwich_norms:
            self.pre_feedforward_layernorm = Norm(cfg.hidden_size, cfg.rms_norm_eps, spec.norm)
            self.post_feedforward_layernorm = Norm(cfg.hidden_size, cfg.rms_norm_eps, spec.norm)
        self.mlp = MLP(proj)

    @property
    def mlp_norm(self) -> Norm:
        """The norm of the MLP's input."""
        return self.pre_feedforward_layernorm if self.spec.sandwich_norms else self.post_attention_layernorm

    def projections(self) -> dict[str, Linear]:
        """The seven projections by their PEFT target name."""
        a, m = self.self_attn, self.mlp
        return {"q_proj": a.q_proj, "k_proj": a.k_proj, "v_proj": a.v_proj, "o_proj": a.o_proj,
                "gate_proj": m.gate_proj, "up_proj": m.up_proj, "down_proj": m.down_proj}

    def forward(self, x, run: LayerRun):
        """The layer's steps, the only place they are written: x [B, T, d] -> y [B, T, d] (or what run.output
        makes of it). `run` says how projections and attention execute and what is kept for a backward
        (LayerRun here; MeSP's StructuredRun); methods.mesp.layer_backward walks these steps in reverse.

        Everything but attention is token-wise: attention_inputs and after_attention may run on any slice of
        positions (with the rope rows of those positions), which is how MeSP runs them over token chunks.
        Every intermediate is dropped after its last use (run.keep holds those a backward needs), so a run that
        keeps nothing holds at most a few [B, T, *] tensors at once."""
        return self.after_attention(self.attention(x, run), x, run)

    def attention(self, x, run: LayerRun):
        """attention_inputs over all T positions, then attention: x [B, T, d] -> o [B, Hq, T, D]."""
        q, k, v = self.attention_inputs(x, run)
        o = run.attend(q, k, v, self.spec.attention)
        run.keep(q=q, k=k, v=v, o=o)
        return o

    def attention_inputs(self, x, run: LayerRun):
        """The token-wise steps before attention: x [B, T, d] -> q [B, Hq, T, D], k, v [B, Hkv, T, D] (the input
        norm, the q/k/v projections, q/k norms, RoPE by run.rope, which covers these T positions)."""
        attn, spec = self.self_attn, self.spec
        n1 = self.input_layernorm(x)
        q = attn.split_heads(run.project("q_proj", attn.q_proj, n1), attn.num_heads)
        k = attn.split_heads(run.project("k_proj", attn.k_proj, n1), attn.num_kv_heads)
        if spec.qk_norm:  # per head, before RoPE
            run.keep(q_pre=q, k_pre=k)
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = rotate(q, run.rope), rotate(k, run.rope)
        v = attn.split_heads(run.project("v_proj", attn.v_proj, n1), attn.num_kv_heads)
        run.keep(n1=n1)
        return q, k, v

    def after_attention(self, o, x, run: LayerRun):
        """The token-wise steps after attention: the attention output o [B, Hq, T, D] and the layer input x
        [B, T, d] of the same positions -> y [B, T, d] (o_proj, its residual, the MLP and its residual)."""
        mlp, spec = self.mlp, self.spec
        B, _, T, _ = o.shape
        o_flat = o.transpose(1, 2).reshape(B, T, -1)
        del o
        a = run.project("o_proj", self.self_attn.o_proj, o_flat)
        if spec.sandwich_norms:  # the attention output is normalized before the residual
            run.keep(a=a)
            a = self.post_attention_layernorm(a)
        h1 = run.residual(a, x)
        del a
        run.keep(o_flat=o_flat, h1=h1)
        del o_flat
        n2 = self.mlp_norm(h1)
        G = run.project("gate_proj", mlp.gate_proj, n2)
        U = run.project("up_proj", mlp.up_proj, n2)
        run.keep(n2=n2, G=G, U=U)
        del n2
        M = self.spec.activation.forward(G, U)
        del G, U
        run.keep(M=M)
        return run.output("down_proj", mlp.down_proj, M, h1,
                          self.post_feedforward_layernorm if spec.sandwich_norms else None)


def rotate(t, rope):
    """The RoPE step: t [B, H, T, hd] rotated by rope = (cos, sin), or t itself in a layer without RoPE."""
    return t if rope is None else ops.rope_forward(t, *rope)


class LayerRun:
    """DecoderLayer.forward's steps through the modules (differentiable, for autograd, MeBP and generation),
    attention by SDPA over an optional KV cache; keeps nothing. `cache` is (k, v) of earlier positions on the
    way in and this call's (k, v) (earlier positions included) on the way out.

    rope: (cos, sin) of the layer's attention kind, or None (Model.rope); masks: the SdpaMasks of this call."""

    def __init__(self, rope, masks: "SdpaMasks", cache=None):
        self.rope, self.masks, self.cache = rope, masks, cache

    def project(self, name: str, proj: Linear, x):
        return proj(x)

    def attend(self, q, k, v, kind: AttentionKind):
        if self.cache is not None:
            k = torch.cat([self.cache[0], k], dim=2)
            v = torch.cat([self.cache[1], v], dim=2)
        self.cache = (k, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.masks(kind.window), scale=kind.scale,
                                              enable_gqa=q.shape[1] != k.shape[1])

    def residual(self, y, x):
        return x + y

    def keep(self, **tensors):
        pass

    def output(self, name: str, proj: Linear, m, residual, norm=None):
        """The last step: the output projection (normalized by `norm`, with sandwich norms) plus the residual."""
        y = proj(m)
        return residual + (y if norm is None else norm(y))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = Embedding()
        self.layers = nn.ModuleList(DecoderLayer(cfg, cfg.layer_spec(i)) for i in range(cfg.num_hidden_layers))
        self.norm = Norm(cfg.hidden_size, cfg.rms_norm_eps, cfg.family.norm)


class Model(nn.Module):
    """Decoder-only LM. Build one with mesp.load_model; `Model(cfg)` alone has empty weights."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else Embedding()  # holds weight [V, d]
        self.source = None  # where the weights came from (set by the loader)
        self.tokenizer_source = None  # (kind, path) for mesp.tokenizer.load_tokenizer

    # ---- weights -------------------------------------------------------------------------
    @property
    def lm_head_weight(self):
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def base_weights(self):
        """(name, tensor-or-quantized) of every frozen base weight, HF names."""
        for name, mod in self.named_modules():
            for attr in ("weight", "bias"):
                w = getattr(mod, attr, None) if not isinstance(mod, Model) else None
                if w is not None and not isinstance(w, nn.Parameter) and not (
                        isinstance(w, torch.Tensor) and w.numel() == 0):
                    yield f"{name}.{attr}", w

    def num_parameters(self) -> int:
        """Base parameters as published (tied embeddings counted once); LoRA excluded."""
        return sum(w.numel() for _, w in self.base_weights())

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        """HF-module-path keyed LoRA parameters, e.g. 'model.layers.0.self_attn.q_proj.lora_A'."""
        out = {}
        for name, mod in self.named_modules():
            if isinstance(mod, Linear) and mod.has_lora:
                out[f"{name}.lora_A"] = mod.lora_A
                out[f"{name}.lora_B"] = mod.lora_B
        return out

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    # ---- forward -------------------------------------------------------------------------
    def rope(self, positions: torch.Tensor) -> list:
        """Per layer: (cos, sin) of its attention kind at `positions`, or None where it has no RoPE; each
        distinct kind's tables are computed once and shared."""
        c, made, per_layer = self.config, [], []
        for layer in self.model.layers:
            kind = layer.spec.attention
            tables = next((t for k, t in made if k == kind), None)
            if tables is None and kind.rope:
                tables = ops.rope_cos_sin(positions, c.head_dim, kind.rope_theta, kind.rope_scaling, dtype=self.dtype)
                made.append((kind, tables))
            per_layer.append(tables)
        return per_layer

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        if self.config.family.embed_scale:  # sqrt(hidden) as fp32, cast to the weights' dtype, as transformers does
            x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=torch.float32).to(x.dtype)
        return x

    def forward(self, input_ids, attention_mask=None, cache=None, return_hidden=False, positions=None):
        """input_ids [B, T]; attention_mask [B, S] (1 = real token; S = cached + T) or None.

        cache: list of per-layer (k, v) from an earlier call, or None. positions: [B, T] RoPE positions of each
        row (left-padded rows count from their first real token), or None: past..past+T-1 for every row.
        Returns logits [B, T, V] (or the final-normed hidden states with return_hidden) and the new cache.
        """
        B, T = input_ids.shape
        past = 0 if cache is None else cache[0][0].shape[2]
        if positions is None:
            positions = torch.arange(past, past + T, device=input_ids.device)
        rope = self.rope(positions)
        masks = SdpaMasks(attention_mask, T, past, input_ids.device)
        x = self.embed(input_ids)
        new_cache = []
        for i, layer in enumerate(self.model.layers):
            run = LayerRun(rope[i], masks, None if cache is None else cache[i])
            x = layer(x, run)
            new_cache.append(run.cache)
        x = self.model.norm(x)
        if return_hidden:
            return x, new_cache
        return self.logits(x), new_cache

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head (and Gemma's final soft-capping) on final-normed hidden states [..., d] -> [..., V]."""
        return blockwise.softcap_logits(ops.frozen_linear(hidden, self.lm_head_weight),
                                        self.config.final_logit_softcapping)


class SdpaMasks:
    """SDPA's bool masks [B or 1, 1, T, past+T] for queries at positions past..past+T-1, by ops.causal_visibility's
    rule (attention_mask [B, past+T], 1 = real token, or None): masks(window) for a layer of that sliding window
    (None: full attention), each built once per call and shared by the layers that attend alike."""

    def __init__(self, attention_mask, T: int, past: int, device):
        self.key_mask = None if attention_mask is None else attention_mask.to(device=device, dtype=torch.bool)
        self.T, self.past, self.device, self.built = T, past, device, {}

    def __call__(self, window: int | None = None) -> torch.Tensor:
        if window not in self.built:
            end = self.past + self.T
            visible = blockwise.causal_visibility(self.past, end, end, self.key_mask, device=self.device, window=window)
            self.built[window] = visible[None, None] if self.key_mask is None else visible[:, None]
        return self.built[window]


def forward(model: Model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, T, V] of `model` for `input_ids` [B, T] (attention_mask [B, T], 1 = real token)."""
    with torch.no_grad():
        return model(input_ids, attention_mask)[0]


def set_weight(model: Model, name: str, value) -> None:
    """Assign a base weight by its HF name (e.g. 'model.layers.0.mlp.up_proj.weight')."""
    mod_path, attr = name.rsplit(".", 1)
    mod = model.get_submodule(mod_path)
    if not isinstance(value, torch.Tensor) and attr in mod._buffers:
        del mod._buffers[attr]  # a quantized weight object is not a buffer; it manages its own storage
    setattr(mod, attr, value)
