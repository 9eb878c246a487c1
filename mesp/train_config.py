"""The settings of a training run: `TrainConfig`, the one place each setting's default, help and choices live.

`mesp train`'s flags are generated from the fields (mesp.settings), a TOML file of the same keys is read by
`TrainConfig.from_toml`, and `resolve` fills the defaults that depend on other settings and checks the whole
run by building what the run will build (the LoRA config, the optimizer, the schedule), so each rule is
written once, in the module that owns it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch

from .errors import MespError
from .estimate import default_keep_layers
from .lora import ALL_TARGETS, LoraConfig, naming_fields
from .data import LONG_SAMPLES
from .methods import CHECKPOINTING_METHODS, METHODS
from .optim import OPTIMIZERS, SCHEDULES, Optimizer, learning_rate, make_optimizer
from .loaders import DTYPE_NAMES, QUANTIZE_CHOICES, QUANTIZE_HELP, WEIGHTS, WEIGHTS_HELP, default_weights
from .precision import AUTO, resolve_dtype
from .presets import PRESETS
from .report_to import REPORT_TO, check_report_to
from .settings import read_toml, setting
from .tables import DATA_HELP, KEYS, DataColumns

# Peak learning rates for rank-8 LoRA on all projections. adamw and sgd: chosen on the shipped
# SmolLM2-135M-Instruct with the demo data (40 steps, batch 4, cosine), where a fifth or a tenth of these
# trained markedly slower; mezo: the MeZO paper's LoRA setting (lr 1e-4, eps 1e-2).
DEFAULT_LR = {"adamw": 1e-3, "sgd": 1e-1, "mezo": 1e-4}
DEFAULT_OPTIMIZER = "adamw"  # MeZO always uses its own SGD
DEFAULT_EPOCHS = 3  # when neither steps nor epochs is given


MODEL_HELP = f"HF model directory, .gguf file or preset name ({', '.join(PRESETS)})"


@dataclass
class TrainConfig(DataColumns):
    """The settings of a run; field names are the `mesp train` flags (dashes become underscores); the data's column
    names (--text-column, ...) are DataColumns' fields.

    None means "pick the default for the other settings" (see `resolve`)."""
    model: str | None = setting(None, MODEL_HELP, path="file_or_name")
    data: str | None = setting(None, DATA_HELP + "; records in the text, prompt/completion, messages or input_ids "
                                           "format", metavar="FILE|DIR", path="file")
    out: str | None = setting(None, "run directory: adapter, metrics.jsonl, checkpoints", metavar="DIR", path="file")
    valid: str | None = setting(None, "validation data, as --data (loss every --eval-every steps)",
                                metavar="FILE|DIR", path="file")
    method: str = setting("mesp", "gradient method", choices=METHODS)
    rank: int = setting(8, "LoRA rank")
    alpha: float = setting(16.0, "LoRA alpha")
    targets: list[str] | str = setting(factory=lambda: list(ALL_TARGETS), help="comma-separated projections")
    steps: int | None = setting(None, "optimizer steps (or --epochs)")
    epochs: int | None = setting(None, "passes over the data",
                                 default_text=f"default {DEFAULT_EPOCHS} when --steps is not given")
    batch_size: int = setting(4, "samples per micro-batch")
    seq_len: int = setting(512, "longest sample in tokens; longer ones are truncated (or skipped: --long-samples)")
    long_samples: str = setting("truncate", "a sample longer than --seq-len: truncate it to its first seq_len tokens "
                                            "or skip it (counted either way)", choices=LONG_SAMPLES)
    lr: float | None = setting(None, "peak learning rate",
                               default_text="default " + ", ".join(f"{v:g} {k}" for k, v in DEFAULT_LR.items()))
    optimizer: str | None = setting(None, "optimizer", choices=OPTIMIZERS,
                                    default_text=f"default {DEFAULT_OPTIMIZER}; mezo: its own sgd")
    momentum: float = setting(0.0, "sgd momentum")
    weight_decay: float = setting(0.0, "weight decay, decoupled for adamw")
    schedule: str = setting("cosine", "learning rate after the warmup", choices=SCHEDULES)
    warmup: int = setting(0, "linear warmup steps")
    # the loss of an accumulated step is normalised by the step's total label count
    grad_accum: int = setting(1, "micro-batches per step")
    seed: int = setting(0, "LoRA init, data order and MeZO directions")
    resume: bool = setting(False, "continue the run in --out from its last checkpoint")
    overwrite: bool = setting(False, "replace the run in --out")
    per_layer_update: bool | None = setting(None, "mesp: update each layer as soon as its gradients exist",
                                            negatable=True, default_text="default: on where possible")
    # both also at the end of the run
    eval_every: int = setting(50, "steps between validation losses")
    save_every: int = setting(100, "steps between checkpoints")
    max_grad_norm: float | None = setting(None, "clip the global gradient norm", default_text="default off")
    train_on_prompt: bool = setting(False, "loss on prompt tokens too")
    dtype: str = setting(AUTO, "compute dtype; auto: bfloat16 where the CPU has native bf16 (AVX512_BF16 or AMX) "
                               "or on CUDA, float32 otherwise", choices=(AUTO, *DTYPE_NAMES))
    device: str = setting("auto", "cpu, cuda, cuda:N, or auto: cuda if available")
    # the allocator-level peak runs the profiler on CPU
    report_to: str = setting("none", "also write each step's loss, learning rate, tokens/s, grad norm, validation "
                                     "loss and private-footprint peak for a viewer (tensorboard: OUT/tensorboard; "
                                     "metrics.jsonl is always written)", choices=REPORT_TO)
    measure_memory: bool = setting(False, "record each step's allocator-level peak memory (slow on CPU)")
    mezo_eps: float = setting(1e-2, "MeZO perturbation size")
    quantize: str | None = setting(None, QUANTIZE_HELP, choices=QUANTIZE_CHOICES)  # passed to load_model
    weights: str | None = setting(None, WEIGHTS_HELP, choices=WEIGHTS)  # passed to load_model
    offload_checkpoints: bool = setting(False, "mesp, mebp: keep each layer's input in a memory-mapped scratch "
                                               "file (in --out, or --scratch-dir) instead of RAM")
    scratch_dir: str | None = setting(None, "directory of the --offload-checkpoints scratch file "
                                            "(default: the run directory)", metavar="DIR")
    memory_budget: float | None = setting(None, "private-footprint budget in MiB: choose the fastest engine "
                                                "settings whose estimate fits it (mesp.planner), or stop before "
                                                "any work when none does", metavar="MB")
    keep_layers: int | None = setting(None, "mesp: the last N layers keep their forward's intermediates instead "
                                            "of recomputing them (faster, more memory; --memory-budget chooses "
                                            "it; 0: none)",
                                      default_text="default: as many as fit in the size of the full-vocabulary "
                                                   "logits MeSP never builds (none with --offload-checkpoints)")
    token_chunk: int | None = setting(None, "mesp: positions per token chunk of a layer's norms, projections and "
                                            "MLP (0: whole sequence)",
                                      default_text="default: whole up to 256 positions, else 128")
    attn_block: int | None = setting(None, "mesp: query rows per block of the blockwise attention",
                                     default_text="default 128, fewer where a score block would pass 8 MiB")
    loss_chunk: int | None = setting(None, "mesp, mezo: labelled tokens per chunk of the LM head's loss",
                                     default_text="default 1024")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_toml(cls, path, **overrides) -> TrainConfig:
        """Settings from a TOML file whose keys are the field names (dashes or underscores), each value checked
        against the field's type; `overrides` win over the file. Raises MespError naming the file and key."""
        return cls(**{**read_toml(cls, path), **overrides})


# Settings that define the run: resuming with any of them changed would not continue the same run.
SAME_RUN_KEYS = ("model", "data", "method", "rank", "alpha", "targets", "batch_size", "seq_len", "lr", "optimizer",
                 "momentum", "weight_decay", "schedule", "warmup", "grad_accum", "seed", "max_grad_norm",
                 "train_on_prompt", "dtype", "mezo_eps", "quantize", "long_samples", *(f"{k}_column" for k in KEYS))


# the engine options TrainConfig carries, and the methods that take each
ENGINE_OPTIONS = {"token_chunk": ("mesp",), "attn_block": ("mesp",), "loss_chunk": ("mesp", "mezo")}


def lora_config(c: TrainConfig) -> LoraConfig:
    return LoraConfig(r=c.rank, alpha=c.alpha, target_modules=c.targets)


def optimizer_of(c: TrainConfig) -> Optimizer:
    """The optimizer of a resolved config (MeZO's resolved optimizer is the plain SGD it follows)."""
    return make_optimizer(c.optimizer, c.weight_decay, c.momentum)


def require_int(c: TrainConfig, names, least: int) -> None:
    for name in names:
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            kind = "a positive" if least == 1 else "a non-negative"
            raise MespError(f"{name}: must be {kind} integer, got {v!r}")


def check_device(name: str) -> None:
    """A device this machine has, before any work: torch itself fails late, with a traceback, on an unknown name
    or a GPU it lacks."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise MespError(f"device: unknown {name!r}; use cpu, cuda, cuda:N or auto") from e
    if device.type not in ("cpu", "cuda"):
        raise MespError(f"device: {name!r} is not supported; use cpu, cuda, cuda:N or auto")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise MespError(f"device: {name!r} is not available (PyTorch sees no CUDA GPU here); use cpu or auto")
        if device.index is not None and device.index >= count:
            raise MespError(f"device: {name!r} is not available (this machine has {count} CUDA GPU(s))")


def check_engine_options(c: TrainConfig) -> None:
    """token_chunk, attn_block and loss_chunk: whole numbers, each given only to a method that uses it."""
    for name, least in (("attn_block", 1), ("token_chunk", 0), ("loss_chunk", 1)):
        if getattr(c, name) is not None:
            require_int(c, (name,), least=least)
    for name, methods in ENGINE_OPTIONS.items():
        if getattr(c, name) is not None and c.method not in methods:
            raise MespError(f"{name}: only used by method{'s' * (len(methods) > 1)} {' and '.join(methods)}, "
                            f"not {c.method}")


def kept_layer_count(c: TrainConfig, config, dtype: str) -> int:
    """How many of the last layers keep their intermediates: keep_layers, or where it is None (mesp only) the
    default (mesp.estimate.default_keep_layers for the model's ModelConfig `config` at c's batch and length in
    compute dtype `dtype`; none where the base is streamed from its file or quantized)."""
    if c.method != "mesp":
        return 0
    if c.keep_layers is not None:
        return c.keep_layers
    weights = c.weights or (default_weights(c.model, c.quantize) if c.model else "resident")
    return default_keep_layers(config, c.seq_len, c.batch_size, dtype, c.method, c.offload_checkpoints, weights,
                               c.quantize)


def engine_options(c: TrainConfig, config, dtype: str = "float32") -> dict:
    """The compute_gradients options of a resolved config's method (its token chunk, attention block, loss
    chunk, and for keep_layers the set of the last kept_layer_count layers of the model's ModelConfig `config`),
    the engine's defaults where the config leaves them None."""
    out = {name: getattr(c, name) for name, methods in ENGINE_OPTIONS.items()
           if c.method in methods and getattr(c, name) is not None}
    keep, num_layers = kept_layer_count(c, config, dtype), config.num_hidden_layers
    if keep:
        out["keep_layers"] = frozenset(range(max(0, num_layers - keep), num_layers))
    return out


def resolve(config: TrainConfig) -> TrainConfig:
    """A copy with defaults filled in and every setting checked (no file is read)."""
    c = dataclasses.replace(config)
    for name in ("model", "data", "out"):
        if not getattr(c, name):
            raise MespError(f"{name}: required")
    # absolute paths, so a resumed run finds (and compares) the same files from any working directory
    c.model, c.out = os.fspath(c.model), os.fspath(c.out)
    c.data = os.path.abspath(c.data)
    c.valid = os.path.abspath(c.valid) if c.valid else None
    if os.path.exists(c.model):
        c.model = os.path.abspath(c.model)
    if c.method not in METHODS:
        raise MespError(f"method: unknown {c.method!r}; choose from {', '.join(METHODS)}")
    with naming_fields(r="rank", target_modules="targets"):
        c.targets = list(lora_config(c).target_modules)  # a comma-separated string becomes the list
    require_int(c, ("batch_size", "seq_len", "grad_accum", "eval_every", "save_every"), least=1)
    require_int(c, ("warmup", "seed"), least=0)
    if c.steps is not None and c.epochs is not None:
        raise MespError("give steps or epochs, not both")
    require_int(c, [name for name in ("steps", "epochs") if getattr(c, name) is not None], least=1)
    if c.steps is None and c.epochs is None:
        c.epochs = DEFAULT_EPOCHS
    check_device(c.device)
    check_report_to(c.report_to)
    if c.dtype not in (AUTO, *DTYPE_NAMES):
        raise MespError(f"dtype: unknown {c.dtype!r}; choose from {AUTO}, {', '.join(DTYPE_NAMES)}")
    # resolved once, so a resumed run (SAME_RUN_KEYS) keeps the precision it started with on any machine
    c.dtype = resolve_dtype(c.dtype, "cuda" if c.device == "auto" and torch.cuda.is_available() else
                            ("cpu" if c.device == "auto" else c.device))
    if c.method == "mezo":
        if c.optimizer not in (None, "sgd"):
            raise MespError(f"optimizer {c.optimizer}: MeZO trains with its own seed-trick SGD; use sgd")
        c.optimizer = "sgd"
        for name, bad in (("grad_accum", c.grad_accum != 1), ("per_layer_update", bool(c.per_layer_update)),
                          ("max_grad_norm", c.max_grad_norm is not None), ("momentum", bool(c.momentum))):
            if bad:
                raise MespError(f"{name}: not available with method mezo")
        c.per_layer_update = False
    else:
        c.optimizer = c.optimizer or DEFAULT_OPTIMIZER
        compatible = c.method == "mesp" and c.grad_accum == 1 and c.max_grad_norm is None
        if c.per_layer_update is None:
            c.per_layer_update = compatible
        elif c.per_layer_update and not compatible:
            why = ("needs method mesp" if c.method != "mesp" else
                   "needs grad_accum 1 (accumulation holds every gradient anyway)" if c.grad_accum != 1 else
                   "cannot clip by the global gradient norm (max_grad_norm)")
            raise MespError(f"per_layer_update: {why}")
    optimizer_of(c)  # checks optimizer, momentum and weight_decay (MeZO's decay follows SGD's rule)
    if c.lr is None:
        c.lr = DEFAULT_LR["mezo" if c.method == "mezo" else c.optimizer]
    for name in ("lr", "mezo_eps"):
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
            raise MespError(f"{name}: must be a positive number, got {v!r}")
    c.lr, c.alpha = float(c.lr), float(c.alpha)
    learning_rate(0, c.lr, 1, c.schedule, c.warmup)  # checks the schedule
    if c.max_grad_norm is not None and not c.max_grad_norm > 0:
        raise MespError(f"max_grad_norm: must be positive, got {c.max_grad_norm!r}")
    if c.offload_checkpoints and c.method not in CHECKPOINTING_METHODS:
        raise MespError(f"offload_checkpoints: method {c.method} keeps no per-layer checkpoints; use "
                        f"{' or '.join(CHECKPOINTING_METHODS)}")
    if c.scratch_dir is not None:
        if not c.offload_checkpoints:
            raise MespError("scratch_dir: only used with offload_checkpoints")
        c.scratch_dir = os.path.abspath(c.scratch_dir)
    if c.keep_layers is not None:
        require_int(c, ("keep_layers",), least=0)
    if c.keep_layers and c.method != "mesp":
        raise MespError(f"keep_layers: only method mesp recomputes layers; got method {c.method}")
    if c.memory_budget is not None and not (isinstance(c.memory_budget, (int, float)) and c.memory_budget > 0
                                            and not isinstance(c.memory_budget, bool)):
        raise MespError(f"memory_budget: must be a positive number of MiB, got {c.memory_budget!r}")
    check_engine_options(c)
    if c.resume and c.overwrite:
        raise MespError("give resume or overwrite, not both")
    return c

