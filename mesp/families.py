"""Model families: the one description of each architecture's decoder layer, and its Hugging Face config.

A `Family` says what a family's layer is made of (norm kind, MLP activation, which projections carry biases,
extra norms, the attention kind of each layer); `Family.layer_spec` resolves it for one layer of one
configuration into a `LayerSpec`. Everything that spells out a layer reads that spec and nothing else:

* `mesp.model.DecoderLayer` builds its modules from it and runs its forward as the spec's steps (the same
  forward serves autograd, KV-cache generation, MeBP's recompute and MeSP's structured recompute);
* `mesp.methods.mesp.layer_backward` walks those steps in reverse with each op's hand-derived backward;
* `expected_shapes` (what loaders check every tensor against) and `mesp.random_init` list the layer's tensors
  from it.

Each kind names a forward/backward pair in mesp.ops (`NORMS`, `ACTIVATIONS`), and `FAMILIES` is the one table of
architectures: our name (HF model_type) <-> HF class <-> description.

Adding a family (e.g. Gemma 3) touches:
1. `FAMILIES`: one `Family(...)` row (Qwen3 is `qk_norm=True` with `layer_types_attention`; Gemma 3 would be
   `norm=NORMS["rms_offset"]`, `activation=ACTIVATIONS["geglu"]`, `sandwich_norms=True`, and a `layer_attention`
   giving sliding-window layers their rope θ), plus `ModelConfig.from_hf` for any new config.json field;
2. mesp.ops: the new forward/backward pairs (a (1+w) RMSNorm, GeGLU), each autograd-checked in
   tests/test_ops.py, entered in `NORMS` / `ACTIVATIONS`;
3. a new kind of step only (as q/k norms and sliding windows were; sandwich norms are next): written once in
   `DecoderLayer`'s steps (attention_inputs before attention, after_attention after it), once in reverse in
   `methods.mesp.layer_backward`, its weights in `layer_shapes` and
   `DecoderLayer.__init__`; then take it off `LayerSpec.__post_init__`'s list of features without ops.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

from . import ops
from .errors import MespError


# ---- op kinds: each a forward/backward pair of mesp.ops -------------------------------------------------

@dataclass(frozen=True)
class NormKind:
    """y = forward(x, weight, eps); gx = backward(gy, x, weight, eps). `init` is the weight's neutral value."""
    forward: Callable
    backward: Callable
    init: float


@dataclass(frozen=True)
class ActivationKind:
    """The gated MLP's m = forward(G, U); (gG, gU) = backward(gM, G, U). `hf_name`: config.json hidden_act."""
    forward: Callable
    backward: Callable
    hf_name: str


NORMS = {"rms": NormKind(ops.rmsnorm_forward, ops.rmsnorm_backward, init=1.0),
         "rms_offset": NormKind(ops.rmsnorm_offset_forward, ops.rmsnorm_offset_backward, init=0.0)}  # Gemma: 1 + w
ACTIVATIONS = {"swiglu": ActivationKind(ops.swiglu_forward, ops.swiglu_backward, hf_name="silu"),
               "geglu": ActivationKind(ops.geglu_forward, ops.geglu_backward, hf_name="gelu_pytorch_tanh")}


# ---- one layer's description ----------------------------------------------------------------------------

@dataclass(frozen=True)
class AttentionKind:
    """How one layer attends: causal over every earlier position (window None) or the last `window` ones, with
    rotary embeddings of base `rope_theta` (and HF `rope_scaling`) or none, scores scaled by `scale` (None:
    1/sqrt(head_dim))."""
    rope: bool = True
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    window: int | None = None
    scale: float | None = None


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer of one configuration, as every layer implementation reads it."""
    norm: NormKind
    activation: ActivationKind
    qkv_bias: bool  # q_proj, k_proj, v_proj carry biases
    o_bias: bool  # o_proj carries a bias
    attention: AttentionKind
    qk_norm: bool = False  # a norm on q and k per head, before RoPE (Qwen3, Gemma 3)
    sandwich_norms: bool = False  # norms on the attention and MLP outputs too (Gemma 2/3)



class Projection(NamedTuple):
    in_features: int
    out_features: int
    bias: bool


def projections(cfg: "ModelConfig", spec: LayerSpec) -> dict[str, Projection]:
    """The layer's seven projections by module path, in forward order (also the random weights' draw order)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return {
        "self_attn.q_proj": Projection(d, q, spec.qkv_bias), "self_attn.k_proj": Projection(d, kv, spec.qkv_bias),
        "self_attn.v_proj": Projection(d, kv, spec.qkv_bias), "self_attn.o_proj": Projection(q, d, spec.o_bias),
        "mlp.gate_proj": Projection(d, f, False), "mlp.up_proj": Projection(d, f, False),
        "mlp.down_proj": Projection(f, d, False),
    }


def layer_shapes(cfg: "ModelConfig", spec: LayerSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor of one layer (name relative to the layer) -> shape: norms, projection weights in forward
    order, then biases."""
    proj = projections(cfg, spec)
    d = cfg.hidden_size
    shapes = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,)}
    if spec.sandwich_norms:
        shapes.update({"pre_feedforward_layernorm.weight": (d,), "post_feedforward_layernorm.weight": (d,)})
    if spec.qk_norm:
        shapes.update({"self_attn.q_norm.weight": (cfg.head_dim,), "self_attn.k_norm.weight": (cfg.head_dim,)})
    shapes.update({f"{name}.weight": (p.out_features, p.in_features) for name, p in proj.items()})
    shapes.update({f"{name}.bias": (p.out_features,) for name, p in proj.items() if p.bias})
    return shapes


def expected_shapes(cfg: "ModelConfig") -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for this configuration (loaders check every tensor against it)."""
    d = cfg.hidden_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.num_hidden_layers):
        shapes.update({f"model.layers.{i}.{name}": s for name, s in layer_shapes(cfg, cfg.layer_spec(i)).items()})
    return shapes


# ---- families -------------------------------------------------------------------------------------------

def full_attention(cfg: "ModelConfig", index: int) -> AttentionKind:
    """Every layer alike: causal attention over all earlier positions, the config's RoPE."""
    return AttentionKind(rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling)


def layer_types_attention(cfg: "ModelConfig", index: int) -> AttentionKind:
    """transformers' `layer_types`: a "sliding_attention" layer sees the last `sliding_window` positions, and
    `no_rope_layers` (SmolLM3: 0 = this layer has no RoPE) turns RoPE off per layer."""
    sliding = cfg.layer_types is not None and cfg.layer_types[index] == "sliding_attention"
    rope = cfg.no_rope_layers is None or bool(cfg.no_rope_layers[index])
    return AttentionKind(rope=rope, rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
                         window=cfg.sliding_window if sliding else None)


def qwen_layer_types(hf: dict, layers: int, window: int | None) -> list[str]:
    """Qwen2/Qwen3's default layer_types: sliding from layer max_window_layers on, when a window is in force."""
    first = hf.get("max_window_layers", 28)
    return ["sliding_attention" if window is not None and i >= first else "full_attention" for i in range(layers)]


def smollm3_layer_types(hf: dict, layers: int, window: int | None) -> list[str]:
    """SmolLM3's default layer_types: sliding on the layers without RoPE, when a window is in force."""
    no_rope = hf.get("no_rope_layers") or default_no_rope_layers(hf, layers)
    return ["sliding_attention" if window is not None and not no_rope[i] else "full_attention"
            for i in range(layers)]


def gemma_layer_types(hf: dict, layers: int, window: int | None) -> list[str]:
    """Gemma 3's default layer_types: every `sliding_window_pattern`-th layer (default 6th) attends fully, the
    others through the sliding window."""
    pattern = hf.get("sliding_window_pattern", 6)
    if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
        raise MespError(f"sliding_window_pattern must be a positive integer, got {pattern!r}")
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]


def gemma_attention(cfg: "ModelConfig", index: int) -> AttentionKind:
    """Gemma 3: sliding layers use the local RoPE base (no scaling), full layers the global one (and its scaling);
    every layer scales scores by query_pre_attn_scalar^-1/2."""
    scale = cfg.query_pre_attn_scalar ** -0.5
    if cfg.layer_types is not None and cfg.layer_types[index] == "sliding_attention":
        return AttentionKind(rope_theta=cfg.rope_local_base_freq, window=cfg.sliding_window, scale=scale)
    return AttentionKind(rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling, scale=scale)


def default_no_rope_layers(hf: dict, layers: int) -> list[int]:
    """SmolLM3: every `no_rope_layer_interval`-th layer (default 4th) has no RoPE (0), the others have it (1)."""
    interval = hf.get("no_rope_layer_interval", 4)
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise MespError(f"no_rope_layer_interval must be a positive integer, got {interval!r}")
    return [int((i + 1) % interval != 0) for i in range(layers)]


@dataclass(frozen=True)
class Family:
    """What a family's layers are made of; `layer_spec` resolves it for one layer of a configuration."""
    arch: str  # our name, and config.json's model_type
    hf_class: str  # config.json's architectures[0]
    norm: NormKind = NORMS["rms"]  # every norm of the model, the final one included
    activation: ActivationKind = ACTIVATIONS["swiglu"]
    qkv_bias_always: bool = False  # q/k/v biases whatever attention_bias says (Qwen2's config has no such field)
    o_bias_follows_attention_bias: bool = False  # attention_bias also covers o_proj (transformers' Llama)
    qk_norm: bool = False
    sandwich_norms: bool = False
    layer_attention: Callable[["ModelConfig", int], AttentionKind] = full_attention  # (cfg, layer index) -> kind
    # (config.json dict, layers, window in force) -> layer_types when config.json has none; None: no sliding window
    default_layer_types: Callable[[dict, int, int | None], list[str]] | None = None
    has_no_rope_layers: bool = False  # config.json's no_rope_layers turns RoPE off per layer (SmolLM3)
    window_always: bool = False  # sliding_window is in force without use_sliding_window (Gemma 3)
    embed_scale: bool = False  # embeddings multiplied by sqrt(hidden_size), cast to the weight dtype (Gemma 3)
    activation_field: str = "hidden_act"  # config.json's name for the activation (Gemma 3: hidden_activation)

    def layer_spec(self, cfg: "ModelConfig", index: int) -> LayerSpec:
        return LayerSpec(norm=self.norm, activation=self.activation,
                         qkv_bias=cfg.attention_bias,
                         o_bias=cfg.attention_bias and self.o_bias_follows_attention_bias,
                         attention=self.layer_attention(cfg, index), qk_norm=self.qk_norm,
                         sandwich_norms=self.sandwich_norms)


FAMILIES = {f.arch: f for f in (
    Family("llama", "LlamaForCausalLM", o_bias_follows_attention_bias=True),
    Family("qwen2", "Qwen2ForCausalLM", qkv_bias_always=True, layer_attention=layer_types_attention,
           default_layer_types=qwen_layer_types),
    Family("qwen3", "Qwen3ForCausalLM", o_bias_follows_attention_bias=True, qk_norm=True,
           layer_attention=layer_types_attention, default_layer_types=qwen_layer_types),
    Family("smollm3", "SmolLM3ForCausalLM", o_bias_follows_attention_bias=True,
           layer_attention=layer_types_attention, default_layer_types=smollm3_layer_types, has_no_rope_layers=True),
    Family("gemma3_text", "Gemma3ForCausalLM", norm=NORMS["rms_offset"], activation=ACTIVATIONS["geglu"],
           o_bias_follows_attention_bias=True, qk_norm=True, sandwich_norms=True, layer_attention=gemma_attention,
           default_layer_types=gemma_layer_types, window_always=True, embed_scale=True,
           activation_field="hidden_activation"),
)}
HF_CLASSES = {f.hf_class: f for f in FAMILIES.values()}


def rope_settings(hf: dict, family: Family, where: str) -> tuple[float, dict | None, float | None]:
    """(rope_theta, rope_scaling or None, RoPE base of sliding layers or None) of a config.json dict: the flat
    rope_theta / rope_scaling (or transformers 5's rope_parameters), and for Gemma 3 its per-layer-type
    rope_parameters or the older rope_theta / rope_scaling / rope_local_base_freq."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or None
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is not None and not isinstance(value, dict):
            raise MespError(f"{where}: {key} must be an object, got {type(value).__name__}")
    local_theta = None
    if family.arch == "gemma3_text":
        if "full_attention" in params or "sliding_attention" in params:
            full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
            if not isinstance(full, dict) or not isinstance(local, dict):
                raise MespError(f"{where}: rope_parameters per layer type must be objects")
            if local.get("rope_type", "default") != "default":
                raise MespError(f"{where}: rope_parameters.sliding_attention: only the default RoPE is supported")
            local_theta = config_float(local, "rope_theta", where, 10000.0)
            params = full
        else:
            local_theta = config_float(hf, "rope_local_base_freq", where, 10000.0)
        default_theta = 1_000_000.0
    else:
        default_theta = 10000.0
    if scaling is None and params.get("rope_type", "default") not in ("default", None):
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    theta = hf.get("rope_theta", params.get("rope_theta", default_theta))
    return config_float({"rope_theta": theta}, "rope_theta", where, default_theta), scaling, local_theta


def layer_kinds(hf: dict, family: Family, layers: int, where: str):
    """(sliding_window in force or None, layer_types or None, no_rope_layers or None) of a config.json dict, as
    transformers reads them for `family`: the window is in force only with use_sliding_window; layer_types and
    no_rope_layers default as the family's config class computes them. Each is checked (types, one entry per
    layer) before anything is built."""
    if family.default_layer_types is None:
        return None, None, None
    window = None
    if family.window_always:
        window = config_size(hf, "sliding_window", where, default=4096)
    elif hf.get("use_sliding_window") and hf.get("sliding_window") is not None:
        window = config_size(hf, "sliding_window", where)
    no_rope = None
    if family.has_no_rope_layers:
        try:
            no_rope = hf.get("no_rope_layers") or default_no_rope_layers(hf, layers)
        except MespError as e:
            raise MespError(f"{where}: {e}") from e
        if not (isinstance(no_rope, list) and len(no_rope) == layers and all(v in (0, 1) for v in no_rope)):
            raise MespError(f"{where}: no_rope_layers must list 0 or 1 for each of the {layers} layers")
        no_rope = [int(v) for v in no_rope]
    types = hf.get("layer_types")
    if types is None:
        types = family.default_layer_types({**hf, "no_rope_layers": no_rope}, layers, window)
    kinds = ("full_attention", "sliding_attention")
    if not (isinstance(types, list) and len(types) == layers and all(t in kinds for t in types)):
        raise MespError(f"{where}: layer_types must give one of {', '.join(kinds)} for each of the {layers} layers")
    # None when every layer is alike (full attention, RoPE everywhere): the plain config needs no per-layer lists
    if window is None or "sliding_attention" not in types:
        window, types = None, None
    if no_rope is not None and all(no_rope):
        no_rope = None
    return window, types, no_rope


# ---- configuration --------------------------------------------------------------------------------------

# Upper bounds on the sizes a config may give: far above every published model of the supported families
# (and any mesp targets), low enough that the module tree, RoPE tables and shape checks built from a config
# stay small. A config is read before any tensor is, so a hostile or mistyped size must stop here rather than
# allocate until the machine is full.
MAX_SIZES = {"vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 18,
             "num_hidden_layers": 1024, "num_attention_heads": 1024, "num_key_value_heads": 1024,
             "head_dim": 4096, "max_position_embeddings": 1 << 26, "sliding_window": 1 << 26}


def config_size(hf: dict, key: str, where: str, default: int | None = None) -> int:
    """hf[key] as a size in 1..MAX_SIZES[key] (an integer; an integral float is accepted, as some exporters
    write them); a one-line MespError naming `where` and the field otherwise."""
    value = hf.get(key)
    if value is None:
        if default is None:
            raise MespError(f"{where}: missing field {key!r}")
        value = default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise MespError(f"{where}: {key} must be an integer, got {value!r}")
    if not 1 <= value <= MAX_SIZES[key]:
        raise MespError(f"{where}: {key} {value} is out of range (1..{MAX_SIZES[key]})")
    return value


def config_float(hf: dict, key: str, where: str, default: float) -> float:
    """hf[key] (or `default`) as a finite positive float; a one-line MespError naming the field otherwise."""
    value = hf.get(key)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise MespError(f"{where}: {key} must be a finite positive number, got {value!r}")
    return float(value)


@dataclass
class ModelConfig:
    arch: str  # a key of FAMILIES
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
    sliding_window: int | None = None  # in force on "sliding_attention" layers (None: no layer slides)
    layer_types: list[str] | None = None  # per layer: "full_attention" or "sliding_attention"
    no_rope_layers: list[int] | None = None  # per layer: 1 = RoPE, 0 = none (SmolLM3)
    rope_local_base_freq: float | None = None  # RoPE base of sliding layers (Gemma 3; rope_theta is the global one)
    query_pre_attn_scalar: float | None = None  # scores scaled by its -1/2 power (Gemma 3)
    final_logit_softcapping: float | None = None  # logits -> c tanh(logits / c) (Gemma)
    extra: dict = field(default_factory=dict)  # untouched HF fields, written back on export

    @property
    def family(self) -> Family:
        return FAMILIES[self.arch]

    def layer_spec(self, index: int) -> LayerSpec:
        return self.family.layer_spec(self, index)

    @classmethod
    def from_hf(cls, hf: dict, where: str = "config.json") -> "ModelConfig":
        """Read a transformers config.json dict; `where` names the source in error messages."""
        archs = hf.get("architectures") or []
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise MespError(f"{where}: architectures must be a list of class names, got {archs!r}")
        model_type = hf.get("model_type")
        if model_type is not None and not isinstance(model_type, str):
            raise MespError(f"{where}: model_type must be a string, got {model_type!r}")
        hf_class = archs[0] if archs else FAMILIES[model_type].hf_class if model_type in FAMILIES else model_type
        if hf_class not in HF_CLASSES:
            raise MespError(f"{where}: unsupported architecture {hf_class!r} "
                            f"(supported: {', '.join(sorted(HF_CLASSES))})")
        family = HF_CLASSES[hf_class]
        activation = hf.get(family.activation_field, family.activation.hf_name)
        if activation != family.activation.hf_name:
            raise MespError(f"{where}: {family.activation_field} {activation!r} is not supported for {family.arch} "
                            f"(only {family.activation.hf_name!r})")
        for key in ("attn_logit_softcapping", "use_bidirectional_attention"):
            if hf.get(key):
                raise MespError(f"{where}: {key} = {hf[key]!r} is not supported")
        rope_theta, scaling, local_theta = rope_settings(hf, family, where)
        heads = config_size(hf, "num_attention_heads", where)
        hidden = config_size(hf, "hidden_size", where)
        if hf.get("head_dim") is None and hidden // heads == 0:
            raise MespError(f"{where}: hidden_size {hidden} is smaller than num_attention_heads {heads}")
        cfg = cls(
            arch=family.arch,
            vocab_size=config_size(hf, "vocab_size", where),
            hidden_size=hidden,
            intermediate_size=config_size(hf, "intermediate_size", where),
            num_hidden_layers=config_size(hf, "num_hidden_layers", where),
            num_attention_heads=heads,
            num_key_value_heads=config_size(hf, "num_key_value_heads", where, default=heads),
            head_dim=config_size(hf, "head_dim", where, default=hidden // heads),
            rms_norm_eps=config_float(hf, "rms_norm_eps", where, 1e-6),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=family.qkv_bias_always or bool(hf.get("attention_bias", False)),
            max_position_embeddings=config_size(hf, "max_position_embeddings", where, default=2048),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            rope_local_base_freq=local_theta,
        )
        if family.arch == "gemma3_text":
            cfg.query_pre_attn_scalar = config_float(hf, "query_pre_attn_scalar", where, 256.0)
        if hf.get("final_logit_softcapping") is not None:
            cfg.final_logit_softcapping = config_float(hf, "final_logit_softcapping", where, 1.0)
        cfg.sliding_window, cfg.layer_types, cfg.no_rope_layers = layer_kinds(hf, family, cfg.num_hidden_layers, where)
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise MespError(f"{where}: num_attention_heads {cfg.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads {cfg.num_key_value_heads}")
        known = set(asdict(cfg)) | {"architectures", "model_type", "rope_parameters", "head_dim",
                                    family.activation_field}
        cfg.extra = {k: v for k, v in hf.items() if k not in known}
        return cfg

    def to_hf(self) -> dict:
        """A transformers config.json dict for this architecture."""
        family = self.family
        d = {k: v for k, v in asdict(self).items() if k not in ("arch", "extra")}
        for key in ("sliding_window", "layer_types", "no_rope_layers", "rope_local_base_freq", "query_pre_attn_scalar",
                    "final_logit_softcapping"):
            if d[key] is None:
                del d[key]
        d.update(self.extra)
        d["architectures"] = [family.hf_class]
        d["model_type"] = family.arch
        if family.qkv_bias_always:
            d.pop("attention_bias")
        d[family.activation_field] = family.activation.hf_name
        return d
