"""One decoder-only transformer for the Qwen2/Qwen2.5 and Llama (SmolLM2, Llama 3.x) families.

The module tree mirrors Hugging Face's (`model.layers.3.self_attn.q_proj.weight`, `lm_head.weight`), so
checkpoint names, PEFT adapter keys and merged exports need no renaming table. Base weights are frozen
buffers (or quantized weight objects, see mesp.quant), never Parameters: the only trainable tensors are
LoRA's, and the engines in mesp.methods read the weights directly to run their own backward passes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .errors import MespError

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


@dataclass
class ModelConfig:
    arch: str  # "llama" or "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (always on in Qwen2)
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    extra: dict = field(default_factory=dict)  # untouched HF fields, written back on export

    @classmethod
    def from_hf(cls, hf: dict, where: str = "config.json") -> "ModelConfig":
        """Read a transformers config.json dict; `where` names the source in error messages."""
        archs = hf.get("architectures") or []
        arch_name = archs[0] if archs else {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(
            hf.get("model_type"), hf.get("model_type"))
        if arch_name not in ARCHITECTURES:
            raise MespError(f"{where}: unsupported architecture {arch_name!r} "
                            f"(supported: {', '.join(sorted(ARCHITECTURES))})")
        arch = ARCHITECTURES[arch_name]
        try:
            heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            rope_params = hf.get("rope_parameters") or {}
            scaling = hf.get("rope_scaling") or None
            if scaling is None and rope_params.get("rope_type", "default") not in ("default", None):
                scaling = dict(rope_params)
            if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
                scaling = None
            cfg = cls(
                arch=arch,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_hidden_layers=int(hf["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hidden // heads),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))),
                rope_scaling=scaling,
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attention_bias=True if arch == "qwen2" else bool(hf.get("attention_bias", False)),
                max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"),
            )
        except KeyError as e:
            raise MespError(f"{where}: missing field {e.args[0]!r}") from e
        except (TypeError, ValueError) as e:
            raise MespError(f"{where}: bad value ({e})") from e
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise MespError(f"{where}: num_attention_heads {cfg.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads {cfg.num_key_value_heads}")
        known = set(asdict(cfg)) | {"architectures", "model_type", "rope_parameters", "head_dim"}
        cfg.extra = {k: v for k, v in hf.items() if k not in known}
        return cfg

    def to_hf(self) -> dict:
        """A transformers config.json dict for this architecture."""
        d = {k: v for k, v in asdict(self).items() if k not in ("arch", "extra")}
        d.update(self.extra)
        d["architectures"] = [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[self.arch]]
        d["model_type"] = self.arch
        if self.arch == "qwen2":
            d.pop("attention_bias")
        d["hidden_act"] = "silu"
        return d


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
        if self.lora_A is not None:
            y = y + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)
        return y


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(dim))

    def forward(self, x):
        return ops.rmsnorm_forward(x, self.weight, self.eps)


class Embedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("weight", torch.empty(0))

    def forward(self, ids):
        return embedding_lookup(self.weight, ids)


def embedding_lookup(weight, ids: torch.Tensor) -> torch.Tensor:
    """Rows of the embedding table; quantized tables dequantize only the rows asked for."""
    if isinstance(weight, torch.Tensor):
        return F.embedding(ids, weight)
    return weight.rows(ids)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = Linear(d, cfg.num_attention_heads * hd, cfg.attention_bias)
        self.k_proj = Linear(d, cfg.num_key_value_heads * hd, cfg.attention_bias)
        self.v_proj = Linear(d, cfg.num_key_value_heads * hd, cfg.attention_bias)
        # Llama's attention_bias also covers o_proj (transformers LlamaAttention); Qwen2's o_proj has none
        self.o_proj = Linear(cfg.num_attention_heads * hd, d, cfg.attention_bias and cfg.arch == "llama")

    def split_heads(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        """[B, T, heads*hd] -> [B, heads, T, hd]"""
        B, T, _ = t.shape
        return t.view(B, T, heads, self.head_dim).transpose(1, 2)

    def forward(self, x, cos, sin, visible, cache=None):
        """x [B, T, d]; visible: bool [B, 1, T, S] (S = cached + T); cache: (k, v) of earlier positions or None."""
        q = ops.rope_forward(self.split_heads(self.q_proj(x), self.num_heads), cos, sin)
        k = ops.rope_forward(self.split_heads(self.k_proj(x), self.num_kv_heads), cos, sin)
        v = self.split_heads(self.v_proj(x), self.num_kv_heads)
        if cache is not None:
            k = torch.cat([cache[0], k], dim=2)
            v = torch.cat([cache[1], v], dim=2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=self.num_heads != self.num_kv_heads)
        B, _, T, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1)), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, False)

    def forward(self, x):
        return self.down_proj(ops.swiglu_forward(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def projections(self) -> dict[str, Linear]:
        """The seven projections by their PEFT target name."""
        a, m = self.self_attn, self.mlp
        return {"q_proj": a.q_proj, "k_proj": a.k_proj, "v_proj": a.v_proj, "o_proj": a.o_proj,
                "gate_proj": m.gate_proj, "up_proj": m.up_proj, "down_proj": m.down_proj}

    def forward(self, x, cos, sin, visible, cache=None):
        a, new_cache = self.self_attn(self.input_layernorm(x), cos, sin, visible, cache)
        h = x + a
        return h + self.mlp(self.post_attention_layernorm(h)), new_cache


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = Embedding()
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Model(nn.Module):
    """Decoder-only LM. Build one with mesp.load_model; `Model(cfg)` alone has empty weights."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else Embedding()  # holds weight [V, d]
        self.source = None  # where the weights came from (set by the loader)
        self.tokenizer_source = None  # (kind, path) for mesp.loaders.load_tokenizer

    # ---- weights -------------------------------------------------------------------------
    @property
    def lm_head_weight(self):
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def layers(self) -> list[DecoderLayer]:
        return list(self.model.layers)

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
    def rope(self, positions: torch.Tensor):
        c = self.config
        return ops.rope_cos_sin(positions, c.head_dim, c.rope_theta, c.rope_scaling, dtype=self.dtype)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids, attention_mask=None, cache=None, return_hidden=False):
        """input_ids [B, T]; attention_mask [B, S] (1 = real token; S = cached + T) or None.

        cache: list of per-layer (k, v) from an earlier call, or None. Returns logits [B, T, V]
        (or the final-normed hidden states with return_hidden) and the new cache.
        """
        B, T = input_ids.shape
        past = 0 if cache is None else cache[0][0].shape[2]
        positions = torch.arange(past, past + T, device=input_ids.device)
        cos, sin = self.rope(positions)
        visible = visibility_mask(attention_mask, T, past, input_ids.device)
        x = self.embed(input_ids)
        new_cache = []
        for i, layer in enumerate(self.model.layers):
            x, kv = layer(x, cos, sin, visible, None if cache is None else cache[i])
            new_cache.append(kv)
        x = self.model.norm(x)
        if return_hidden:
            return x, new_cache
        return ops.frozen_linear(x, self.lm_head_weight), new_cache


def visibility_mask(attention_mask, T: int, past: int, device) -> torch.Tensor:
    """bool [B or 1, 1, T, past+T]: query i (absolute past+i) sees key j iff j <= past+i and
    (attention_mask[b, j] or j == past+i). The diagonal stays visible so a padded row is never all-masked
    (no NaN); padded positions carry label -100, so what they compute never reaches the loss."""
    S = past + T
    qpos = torch.arange(past, S, device=device)[:, None]
    kpos = torch.arange(S, device=device)[None, :]
    causal = kpos <= qpos  # [T, S]
    if attention_mask is None:
        return causal[None, None]
    keep = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :] | (kpos == qpos)[None, None]
    return causal[None, None] & keep


def forward(model: Model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, T, V] of `model` for `input_ids` [B, T] (attention_mask [B, T], 1 = real token)."""
    with torch.no_grad():
        return model(input_ids, attention_mask)[0]


def init_random_weights(model: Model, seed: int = 0, std: float = 0.02) -> Model:
    """Seeded random base weights, as transformers initialises (normal(0, std), norms 1, biases 0): memory and
    speed do not depend on the values, so the published architectures can be measured without downloads."""
    dtype = model.dtype if model.model.norm.weight.numel() else torch.float32
    for name, w in random_weights(model.config, seed, std, dtype):
        set_weight(model, name, w if isinstance(w, torch.Tensor) else w.read_rows(0, w.shape[0]))
    return model


class RandomMatrix:
    """A seeded normal(0, std) matrix drawn on demand, rows in order, so a loader can quantize it block by block
    and the full-precision matrix never exists. Blocks whose row counts are multiples of 16 draw exactly the
    numbers one draw of the whole matrix would (PyTorch's CPU normal_ fills 16 values at a time)."""

    def __init__(self, shape, std: float, dtype: torch.dtype, generator: torch.Generator):
        self.shape, self.std, self.dtype, self.generator = torch.Size(shape), std, dtype, generator
        self._next = 0

    def read_rows(self, n0: int, n1: int) -> torch.Tensor:
        if n0 != self._next:
            raise ValueError(f"RandomMatrix rows are drawn in order: asked for row {n0}, next is {self._next}")
        self._next = n1
        return torch.empty(n1 - n0, *self.shape[1:], dtype=self.dtype).normal_(0.0, self.std, generator=self.generator)


def random_weights(cfg: ModelConfig, seed: int = 0, std: float = 0.02, dtype: torch.dtype = torch.float32):
    """(HF name, weight) of init_random_weights' base weights, in their drawing order: vectors as tensors,
    matrices as RandomMatrix. The matrices share one generator: read each one whole (or block by block, in
    order) before taking the next item."""
    g = torch.Generator().manual_seed(seed)
    shapes = expected_shapes(cfg)
    yield "model.embed_tokens.weight", RandomMatrix(shapes["model.embed_tokens.weight"], std, dtype, g)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", torch.ones(cfg.hidden_size, dtype=dtype)
        yield p + "post_attention_layernorm.weight", torch.ones(cfg.hidden_size, dtype=dtype)
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            yield p + proj + ".weight", RandomMatrix(shapes[p + proj + ".weight"], std, dtype, g)
            if p + proj + ".bias" in shapes:
                yield p + proj + ".bias", torch.zeros(shapes[p + proj + ".bias"], dtype=dtype)
    yield "model.norm.weight", torch.ones(cfg.hidden_size, dtype=dtype)
    if "lm_head.weight" in shapes:
        yield "lm_head.weight", RandomMatrix(shapes["lm_head.weight"], std, dtype, g)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for this configuration (loaders check every tensor against it)."""
    d, hd, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f),
        })
        if cfg.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
            if cfg.arch == "llama":
                shapes[p + "self_attn.o_proj.bias"] = (d,)
    return shapes


def set_weight(model: Model, name: str, value) -> None:
    """Assign a base weight by its HF name (e.g. 'model.layers.0.mlp.up_proj.weight')."""
    mod_path, attr = name.rsplit(".", 1)
    mod = model.get_submodule(mod_path)
    if not isinstance(value, torch.Tensor) and attr in mod._buffers:
        del mod._buffers[attr]  # a quantized weight object is not a buffer; it manages its own storage
    setattr(mod, attr, value)
