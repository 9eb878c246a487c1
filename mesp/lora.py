"""LoRA adapters in PEFT's conventions: initialisation, target names, and the on-disk format.

A LoRA projection computes y = x W^T + (alpha / r) * (x A^T) B^T with A [r, in] Kaiming-uniform and B [out, r]
zero at the start, so training starts from the base model. Adapters are saved exactly as PEFT saves them for
the same Hugging Face model (adapter_config.json + adapter_model.safetensors, keys such as
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), so `PeftModel.from_pretrained` loads ours
and we load theirs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .errors import MespError
from .fileio import write_json
from .formats.safetensors import write_safetensors
from .model import Linear, Model

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# adapter_config.json fields that change what an adapter computes and that mesp does not implement ->
# whether a value is PEFT's default (PEFT writes these fields out with their defaults).
UNSUPPORTED_FIELDS = {
    "bias": lambda v: v in (None, "none"),
    "fan_in_fan_out": lambda v: v in (None, False),
    "layers_to_transform": lambda v: v in (None, []),
    "layers_pattern": lambda v: v in (None, [], ""),
    "modules_to_save": lambda v: v in (None, []),
    "lora_bias": lambda v: v in (None, False),
    "trainable_token_indices": lambda v: v in (None, [], {}),
    "target_parameters": lambda v: v in (None, []),
    "exclude_modules": lambda v: v in (None, [], ""),
}


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16
    target_modules: list[str] = field(default_factory=lambda: list(ALL_TARGETS))
    dropout: float = 0.0

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            self.target_modules = [t.strip() for t in self.target_modules.split(",") if t.strip()]
        unknown = [t for t in self.target_modules if t not in ALL_TARGETS]
        if unknown or not self.target_modules:
            raise MespError(f"target_modules: unknown {', '.join(unknown) or '(empty)'}; "
                            f"choose from {', '.join(ALL_TARGETS)}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise MespError(f"r: must be a positive integer, got {self.r!r}")
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not a > 0 or not math.isfinite(a):
            raise MespError(f"alpha: must be a positive number, got {a!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise MespError(f"dropout: must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def to_peft(self, model: Model) -> dict:
        """adapter_config.json contents, as PEFT writes them for the same transformers model."""
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.r, "lora_alpha": self.alpha,
            "lora_dropout": self.dropout, "target_modules": sorted(self.target_modules), "bias": "none",
            "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "use_rslora": False,
            "use_dora": False, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": model.source,
            "revision": None, "auto_mapping": None, "peft_version": "0.21.2",
        }

    @classmethod
    def from_peft(cls, d: dict, where: str) -> "LoraConfig":
        """The LoraConfig of an adapter_config.json's contents `d`. Every field mesp does not implement must
        hold PEFT's default (which PEFT writes out), so no adapter loads with part of its meaning dropped."""
        if not isinstance(d, dict):
            raise MespError(f"{where}: not a JSON object")
        if d.get("peft_type", "LORA") != "LORA":
            raise MespError(f"{where}: peft_type {d.get('peft_type')!r} is not LORA")
        for key in ("use_dora", "use_rslora"):
            if d.get(key):
                raise MespError(f"{where}: {key} adapters are not supported")
        if d.get("rank_pattern") or d.get("alpha_pattern"):
            raise MespError(f"{where}: rank_pattern/alpha_pattern adapters are not supported")
        for key, value in d.items():
            if key in UNSUPPORTED_FIELDS and not UNSUPPORTED_FIELDS[key](value):
                raise MespError(f"{where}: {key} = {json.dumps(value)} is not supported by mesp "
                                f"(only PEFT's default is)")
        for key in ("r", "lora_alpha"):
            if key not in d:
                raise MespError(f"{where}: missing field {key!r}")
        targets = d.get("target_modules")
        if isinstance(targets, str):  # PEFT also allows a regex; we accept 'all-linear' and exact names
            targets = list(ALL_TARGETS) if targets == "all-linear" else [targets]
        if targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
            raise MespError(f"{where}: target_modules: must be a list of names, got {json.dumps(targets)}")
        dropout = d.get("lora_dropout") or 0.0
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise MespError(f"{where}: lora_dropout: must be a number, got {json.dumps(dropout)}")
        try:
            with naming_fields(alpha="lora_alpha", dropout="lora_dropout"):
                return cls(r=d["r"], alpha=d["lora_alpha"], target_modules=list(targets or []),
                           dropout=float(dropout))
        except MespError as e:  # a bad value (unknown target, bad r): say which file holds it
            raise MespError(f"{where}: {e}") from e


@contextmanager
def naming_fields(**field_of: str) -> Iterator[None]:
    """A LoraConfig MespError names its own parameter ("alpha: must be ..."); name where the value came from
    instead (field_of maps parameter -> file field or setting, e.g. alpha="lora_alpha", r="rank")."""
    try:
        yield
    except MespError as e:
        param, colon, rest = str(e).partition(":")
        if colon and param in field_of:
            raise MespError(f"{field_of[param]}:{rest}") from e
        raise


def peft_key(lora_param_name: str) -> str:
    """'model.layers.0.self_attn.q_proj.lora_A' -> 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'"""
    return f"{PEFT_PREFIX}{lora_param_name}.weight"


def lora_modules(model: Model) -> dict[str, Linear]:
    """HF module path -> Linear, for every projection that carries LoRA."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Linear) and m.has_lora}


def targeted(model: Model, config: LoraConfig) -> dict[str, Linear]:
    """HF module path -> Linear, for every projection `config` targets (whether or not it carries LoRA yet)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, Linear) and name.rpartition(".")[2] in config.target_modules}


def check_rank(model: Model, config: LoraConfig) -> None:
    """Refuse a rank above a targeted projection's smaller dimension before any LoRA matrix is allocated: such a
    rank adds nothing a full-rank update lacks, and a mistyped one would allocate without bound."""
    for name, proj in targeted(model, config).items():
        if config.r > min(proj.in_features, proj.out_features):
            raise MespError(f"r: LoRA rank {config.r} exceeds the dimensions of {name} "
                            f"({proj.out_features} x {proj.in_features})")


def adapter_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The LoRA weights' dtype: fp32 under a bf16 or fp16 base (as PEFT's autocast_adapter_dtype), so an update
    far below a weight's bf16 spacing still lands (the optimizer's fp32 step would otherwise round back to the
    old bf16 value); the model's own dtype otherwise (fp32, or fp64 for derivation checks)."""
    return torch.float32 if model_dtype in (torch.bfloat16, torch.float16) else model_dtype


def add_lora(model: Model, config: LoraConfig | None = None, seed: int = 0) -> Model:
    """Attach LoRA to every targeted projection, initialised as PEFT does: A ~ kaiming_uniform(a=sqrt(5))
    (uniform in +-1/sqrt(in)), B = 0, in adapter_dtype(model.dtype). Replaces any earlier adapter. Returns the
    model."""
    config = config or LoraConfig()
    check_rank(model, config)
    g = torch.Generator().manual_seed(seed)
    dtype, device = adapter_dtype(model.dtype), model.device
    for layer in model.model.layers:
        for target, proj in layer.projections().items():
            if target not in config.target_modules:
                proj.lora_A = proj.lora_B = None
                continue
            bound = 1.0 / math.sqrt(proj.in_features)
            a = torch.empty(config.r, proj.in_features).uniform_(-bound, bound, generator=g)
            proj.lora_A = nn.Parameter(a.to(device=device, dtype=dtype))
            proj.lora_B = nn.Parameter(torch.zeros(proj.out_features, config.r, device=device, dtype=dtype))
            proj.scale = config.scale
    model.lora_config = config
    return model


def adapter_state(model: Model) -> dict[str, torch.Tensor]:
    """PEFT-keyed LoRA tensors of `model`."""
    return {peft_key(name): p for name, p in model.lora_parameters().items()}


def save_adapter(model: Model, out_dir: str | Path, extra_config: dict | None = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors into out_dir, each atomically."""
    config = getattr(model, "lora_config", None)
    if config is None:
        raise MespError("save_adapter: the model has no LoRA adapter (call add_lora first)")
    out_dir = Path(out_dir)
    write_safetensors(out_dir / ADAPTER_WEIGHTS, adapter_state(model), metadata={"format": "pt"})
    cfg = config.to_peft(model)
    cfg.update(extra_config or {})
    write_json(out_dir / ADAPTER_CONFIG, cfg)


def load_adapter(model: Model, adapter_dir: str | Path) -> Model:
    """Load a PEFT LoRA adapter (ours or PEFT's) onto `model`; every key and shape is checked."""
    adapter_dir = Path(adapter_dir)
    cfg_path, weights_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise MespError(f"{p}: not found (an adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MespError(f"{cfg_path}: invalid JSON ({e})") from e
    config = LoraConfig.from_peft(raw, str(cfg_path))
    shapes = adapter_shapes(weights_path)
    expected = {peft_key(f"{name}.lora_{ab}"): (config.r, proj.in_features) if ab == "A"
                else (proj.out_features, config.r)
                for name, proj in targeted(model, config).items() for ab in "AB"}
    missing = sorted(set(expected) - set(shapes))
    unknown = sorted(set(shapes) - set(expected))
    if missing:
        raise MespError(f"{weights_path}: missing tensor {missing[0]} ({len(missing)} missing)")
    if unknown:
        raise MespError(f"{weights_path}: unexpected tensor {unknown[0]} for this model and adapter_config")
    ranks = {shapes[k][0] if ".lora_A." in k else shapes[k][1] for k in expected if len(shapes[k]) == 2}
    if len(ranks) == 1 and ranks != {config.r}:  # every tensor agrees on a rank, the config does not
        raise MespError(f"{cfg_path}: r = {config.r} disagrees with the rank {ranks.pop()} of the tensors in "
                        f"{ADAPTER_WEIGHTS}")
    for key, shape in expected.items():
        if shapes[key] != shape:
            raise MespError(f"{weights_path}: {key} has shape {shapes[key]}, expected {shape}")
    check_rank(model, config)  # every shape checked against the model before anything is allocated
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            tensors = {key: f.get_tensor(stored) for stored, key in stored_keys(f.keys()).items()}
    except (SafetensorError, OSError) as e:
        raise MespError(f"{weights_path}: unreadable ({e})") from e
    add_lora(model, config)
    with torch.no_grad():
        for key, param in adapter_state(model).items():
            param.copy_(tensors[key].to(param.dtype))
    return model


def stored_keys(keys) -> dict[str, str]:
    """Stored tensor name -> PEFT file key. PEFT's in-memory names carry the adapter name
    ('.lora_A.default.weight'); files normally do not."""
    return {k: k.replace(".default.weight", ".weight") for k in keys}


def adapter_shapes(weights_path: Path) -> dict[str, tuple[int, ...]]:
    """PEFT file key -> shape of every tensor in an adapter's safetensors file, from its header alone."""
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            return {key: tuple(f.get_slice(stored).get_shape()) for stored, key in stored_keys(f.keys()).items()}
    except (SafetensorError, OSError) as e:
        raise MespError(f"{weights_path}: unreadable ({e})") from e
