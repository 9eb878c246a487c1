"""LoRA fine-tuning on a JSONL file: `train(TrainConfig(model=..., data=..., out=...))`.

The run directory OUT holds, once training ends:
    adapter_config.json, adapter_model.safetensors    the final adapter (PEFT format)
    train_config.json                                 the resolved settings of the run
    metrics.jsonl                                     one JSON object per step
    checkpoint-NNNNNN/                                the latest checkpoint: adapter, optimizer.safetensors,
                                                      trainer_state.json (step, data position, seeds)
    checkpoint.json                                   which checkpoint is the latest (written last)

A checkpoint is written into a temporary directory, renamed into place, and only then named in
checkpoint.json, so a crash leaves the previous checkpoint intact. Nothing random is drawn from a global
stream: the LoRA init, each epoch's data order and MeZO's directions are functions of the seed (and epoch or
step), so `resume` from a checkpoint continues exactly the uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import Dataset, MicroBatchStream, load_jsonl
from .errors import MespError
from .fileio import write_json, write_text
from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ALL_TARGETS, LoraConfig, adapter_state, add_lora, \
    load_adapter, save_adapter
from .memory import PeakMemory, peak_rss_bytes
from .methods import METHODS, compute_gradients
from .methods import mezo
from .methods.common import prepare_batch
from .seeds import mix_seed
from .optim import OPTIMIZERS, SCHEDULES, clip_grad_norm, learning_rate, make_optimizer

log = logging.getLogger(__name__)

RUN_CONFIG = "train_config.json"
METRICS = "metrics.jsonl"
LATEST = "checkpoint.json"
OPTIMIZER_STATE = "optimizer.safetensors"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"

# Peak learning rates for rank-8 LoRA on all projections. adamw and sgd: measured on the shipped
# SmolLM2-135M-Instruct with the demo data (40 steps, batch 4, cosine): validation loss 1.29 at adamw 2e-4 vs
# 0.34 at 1e-3; 2.02 at sgd 1e-2 vs 0.73 at 1e-1. mezo: the MeZO paper's LoRA setting (lr 1e-4, eps 1e-2).
DEFAULT_LR = {"adamw": 1e-3, "sgd": 1e-1, "mezo": 1e-4}


@dataclass
class TrainConfig:
    """The settings of a run; field names are the `mesp train` flags (dashes become underscores).

    None means "pick the default for the other settings" (see `resolve`)."""
    model: str | None = None  # HF directory, .gguf file or preset name
    data: str | None = None  # training JSONL
    out: str | None = None  # run directory
    valid: str | None = None  # validation JSONL
    method: str = "mesp"  # mesp | mebp | autograd | mezo
    rank: int = 8
    alpha: float = 16.0
    targets: list[str] | str = field(default_factory=lambda: list(ALL_TARGETS))
    steps: int | None = None  # optimizer steps; or
    epochs: int | None = None  # passes over the data (3 when neither is given)
    batch_size: int = 4
    seq_len: int = 512
    lr: float | None = None  # default by optimizer: DEFAULT_LR
    optimizer: str | None = None  # adamw (default) | sgd; MeZO always uses its own SGD
    momentum: float = 0.0  # sgd only
    weight_decay: float = 0.0
    schedule: str = "cosine"  # constant | cosine (after the warmup)
    warmup: int = 0  # linear warmup steps
    grad_accum: int = 1  # micro-batches per step, normalised by the step's total label count
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    per_layer_update: bool | None = None  # mesp: update each layer as soon as its gradients exist
    eval_every: int = 50  # steps between validation losses (and at the end)
    save_every: int = 100  # steps between checkpoints (and at the end)
    max_grad_norm: float | None = None
    train_on_prompt: bool = False
    dtype: str = "float32"
    device: str = "auto"  # auto = cuda if available, else cpu
    measure_memory: bool = False  # allocator-level peak per step (slow on CPU: it runs the profiler)
    mezo_eps: float = 1e-2
    quantize: str | None = None  # passed to load_model when set

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Settings that define the run: resuming with any of them changed would not continue the same run.
SAME_RUN_KEYS = ("model", "data", "method", "rank", "alpha", "targets", "batch_size", "seq_len", "lr", "optimizer",
                 "momentum", "weight_decay", "schedule", "warmup", "grad_accum", "seed", "max_grad_norm",
                 "train_on_prompt", "dtype", "mezo_eps", "quantize")


def config_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


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
    if isinstance(c.targets, str):
        c.targets = [t.strip() for t in c.targets.split(",") if t.strip()]
    c.targets = list(c.targets)
    unknown = [t for t in c.targets if t not in ALL_TARGETS]
    if unknown or not c.targets:
        raise MespError(f"targets: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(ALL_TARGETS)}")
    for name in ("rank", "batch_size", "seq_len", "grad_accum", "eval_every", "save_every"):
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise MespError(f"{name}: must be a positive integer, got {v!r}")
    for name in ("warmup", "seed"):
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise MespError(f"{name}: must be a non-negative integer, got {v!r}")
    if c.steps is not None and c.epochs is not None:
        raise MespError("give steps or epochs, not both")
    for name in ("steps", "epochs"):
        v = getattr(c, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise MespError(f"{name}: must be a positive integer, got {v!r}")
    if c.steps is None and c.epochs is None:
        c.epochs = 3
    if c.schedule not in SCHEDULES:
        raise MespError(f"schedule: unknown {c.schedule!r}; choose from {', '.join(SCHEDULES)}")
    if c.dtype not in ("float32", "bfloat16", "float16"):
        raise MespError(f"dtype: unknown {c.dtype!r}; choose from float32, bfloat16, float16")
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
        c.optimizer = c.optimizer or "adamw"
        if c.optimizer not in OPTIMIZERS:
            raise MespError(f"optimizer: unknown {c.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if c.momentum and c.optimizer != "sgd":
            raise MespError("momentum applies to optimizer sgd only")
        compatible = c.method == "mesp" and c.grad_accum == 1 and c.max_grad_norm is None
        if c.per_layer_update is None:
            c.per_layer_update = compatible
        elif c.per_layer_update and not compatible:
            why = ("needs method mesp" if c.method != "mesp" else
                   "needs grad_accum 1 (accumulation holds every gradient anyway)" if c.grad_accum != 1 else
                   "cannot clip by the global gradient norm (max_grad_norm)")
            raise MespError(f"per_layer_update: {why}")
    if c.lr is None:
        c.lr = DEFAULT_LR["mezo" if c.method == "mezo" else c.optimizer]
    for name in ("lr", "alpha", "mezo_eps"):
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
            raise MespError(f"{name}: must be a positive number, got {v!r}")
    c.lr, c.alpha = float(c.lr), float(c.alpha)
    if c.max_grad_norm is not None and not c.max_grad_norm > 0:
        raise MespError(f"max_grad_norm: must be positive, got {c.max_grad_norm!r}")
    if not 0 <= c.momentum < 1:
        raise MespError(f"momentum: must be in [0, 1), got {c.momentum!r}")
    if not 0 <= c.weight_decay:
        raise MespError(f"weight_decay: must be >= 0, got {c.weight_decay!r}")
    if c.resume and c.overwrite:
        raise MespError("give resume or overwrite, not both")
    return c


@dataclass
class TrainResult:
    out: str
    steps: int  # steps completed in total (including those before a resume)
    total_steps: int
    resumed_from: int  # the checkpoint step this run continued from (0 = fresh)
    loss: float | None  # the last step's training loss
    valid_loss: float | None
    n_samples: int
    n_truncated: int
    tokens: int  # real tokens processed by this invocation
    seconds: float
    config: dict


# ---- the run directory ------------------------------------------------------------------------------------

def run_files(out: Path) -> list[Path]:
    """The files and checkpoints a run writes that exist in `out`."""
    if not out.is_dir():
        return []
    names = {RUN_CONFIG, METRICS, LATEST, ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    return sorted(p for p in out.iterdir() if p.name in names or p.name.startswith(CHECKPOINT_PREFIX)
                  or p.name.startswith("." + CHECKPOINT_PREFIX))


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / LATEST
    if not pointer.is_file():
        return None
    try:
        ckpt = out / json.loads(pointer.read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MespError(f"{pointer}: unreadable ({e})") from e
    if not (ckpt / TRAINER_STATE).is_file():
        raise MespError(f"{pointer}: names {ckpt.name}, which holds no {TRAINER_STATE}")
    return ckpt


def load_run_config(out) -> dict | None:
    """The settings saved by the run in `out` (None if there is none): what `resume` continues."""
    path = Path(out) / RUN_CONFIG
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MespError(f"{path}: unreadable ({e})") from e
    known = set(config_fields()) - {"resume", "overwrite"}  # how to open the run, not what the run is
    return {k: v for k, v in saved.items() if k in known}


def check_out_dir(c: TrainConfig) -> Path | None:
    """Refuse an out directory holding another run unless resuming or overwriting. Returns the checkpoint to
    resume from (None for a fresh run). Nothing is written or deleted here."""
    out = Path(c.out)
    if out.exists() and not out.is_dir():
        raise MespError(f"out {out}: exists and is not a directory")
    existing = run_files(out)
    if c.resume:
        ckpt = latest_checkpoint(out) if out.is_dir() else None
        if ckpt is None:
            raise MespError(f"resume: {out} holds no checkpoint to resume from")
        saved = load_run_config(out)
        if saved is None:
            raise MespError(f"resume: {out / RUN_CONFIG} is missing")
        for key in SAME_RUN_KEYS:
            if key in saved and saved[key] != getattr(c, key):
                raise MespError(f"resume: {key} is {getattr(c, key)!r} but the run in {out} used {saved[key]!r}")
        return ckpt
    if existing and not c.overwrite:
        raise MespError(f"out {out}: holds another run ({existing[0].name}); pass --resume to continue it or "
                        f"--overwrite to replace it")
    return None


def clear_run(out: Path) -> None:
    """Delete what a previous run wrote in `out` (and nothing else)."""
    for p in run_files(out):
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(out: Path, model, optimizer, state: dict) -> Path:
    """Write checkpoint-<step> completely under a temporary name, rename it into place, point LATEST at it,
    then delete older checkpoints."""
    name = f"{CHECKPOINT_PREFIX}{state['step']:06d}"
    final, tmp = out / name, out / f".{name}.tmp"
    for p in (tmp, final):  # leftovers of a crash, never the checkpoint LATEST names (it is older)
        if p.exists():
            shutil.rmtree(p)
    tmp.mkdir(parents=True)
    save_adapter(model, tmp)
    if optimizer is not None:
        optimizer.save(tmp / OPTIMIZER_STATE)
    write_json(tmp / TRAINER_STATE, state)
    os.replace(tmp, final)
    write_json(out / LATEST, {"checkpoint": name, "step": state["step"]})
    for p in out.iterdir():
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name != name:
            shutil.rmtree(p)
    log.info("checkpoint: %s", final)
    return final


def read_metrics(path: Path, up_to_step: int) -> list[str]:
    """The lines of metrics.jsonl for steps <= up_to_step (a resumed run rewrites what came after)."""
    if not path.is_file():
        return []
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= up_to_step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash
    return keep


# ---- evaluation -------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, dataset: Dataset, batch_size: int) -> float:
    """Mean loss per labelled token over the whole dataset (no gradient, chunked LM head)."""
    total = 0.0
    for b in dataset.batches_in_order(batch_size):
        # normalizer 1: loss_only returns the sum over the batch's labelled tokens
        total += mezo.loss_only(model, prepare_batch(model, b.input_ids, b.labels, b.attention_mask, normalizer=1.0))
    return total / dataset.n_targets


# ---- the loop ---------------------------------------------------------------------------------------------

class NonFiniteGradient(Exception):
    pass


def _load_model(c: TrainConfig, device: str):
    from .loaders import load_model

    kwargs = {}
    if c.quantize is not None:
        if "quantize" not in inspect.signature(load_model).parameters:
            raise MespError("quantize: quantized base weights are not available in this version")
        kwargs["quantize"] = c.quantize
    return load_model(c.model, dtype=c.dtype, device=device, **kwargs)


def train(config: TrainConfig, progress: Callable[[dict], None] | None = None) -> TrainResult:
    """Fine-tune LoRA on config.data and write the run into config.out (see the module docstring).

    progress(event) is called with {"event": "start", ...} once, {"event": "step", **metrics} after every step
    and {"event": "checkpoint", ...} after each checkpoint."""
    c = resolve(config)
    out = Path(c.out)
    ckpt = check_out_dir(c)
    device = c.device if c.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")

    from .tokenizer import load_tokenizer

    model = _load_model(c, device)
    max_pos = model.config.max_position_embeddings
    if c.seq_len > max_pos:
        raise MespError(f"seq_len {c.seq_len} exceeds the model's max_position_embeddings {max_pos}")
    read = dict(get_tokenizer=lambda: load_tokenizer(model), seq_len=c.seq_len, train_on_prompt=c.train_on_prompt,
                vocab_size=model.config.vocab_size)
    data = load_jsonl(c.data, **read)
    valid = load_jsonl(c.valid, **read) if c.valid else None
    if data.n_truncated:
        log.warning("%d of %d training samples were longer than seq_len %d and were truncated",
                    data.n_truncated, len(data), c.seq_len)
    data_sha = file_sha256(c.data)

    stream = MicroBatchStream(len(data), c.batch_size, c.seed)
    total_steps = c.steps if c.steps is not None else math.ceil(c.epochs * stream.per_epoch / c.grad_accum)
    add_lora(model, LoraConfig(r=c.rank, alpha=c.alpha, target_modules=c.targets), seed=c.seed)
    optimizer = None if c.method == "mezo" else make_optimizer(c.optimizer, c.weight_decay, c.momentum)
    params = adapter_state(model)

    step, micro_batches, metrics_lines = 0, 0, []
    if ckpt is not None:
        state = json.loads((ckpt / TRAINER_STATE).read_text())
        if state.get("data_sha256") != data_sha:
            raise MespError(f"resume: {c.data} changed since the run in {out} began")
        load_adapter(model, ckpt)
        params = adapter_state(model)
        if optimizer is not None and (ckpt / OPTIMIZER_STATE).is_file():
            optimizer.load(ckpt / OPTIMIZER_STATE, params)
        step, micro_batches = state["step"], state["micro_batches"]
        for stale in out.glob(f".{CHECKPOINT_PREFIX}*.tmp"):  # a checkpoint cut short by the interruption
            shutil.rmtree(stale)
        metrics_lines = read_metrics(out / METRICS, step)
        log.info("resuming %s from step %d", out, step)
    elif run_files(out):
        clear_run(out)  # overwrite: only now that every input has been checked
    resumed_from = step

    write_json(out / RUN_CONFIG, c.to_dict())
    write_text(out / METRICS, "".join(line + "\n" for line in metrics_lines))
    if progress:
        progress({"event": "start", "total_steps": total_steps, "start_step": step, "n_samples": len(data),
                  "n_truncated": data.n_truncated, "device": device})

    def trainer_state() -> dict:
        return {"step": step, "micro_batches": micro_batches, "epoch": micro_batches // stream.per_epoch,
                "position_in_epoch": micro_batches % stream.per_epoch, "seed": c.seed, "data_sha256": data_sha,
                "total_steps": total_steps}

    last_good = ckpt
    loss = valid_loss = None
    tokens_run, started = 0, time.perf_counter()
    measure = c.measure_memory or torch.device(device).type == "cuda"
    with open(out / METRICS, "a") as metrics_file:
        while step < total_steps:
            lr = learning_rate(step, c.lr, total_steps, c.schedule, c.warmup)
            batches = [data.collate(stream.indices(micro_batches + k)) for k in range(c.grad_accum)]
            t0 = time.perf_counter()
            tracker = PeakMemory(device) if measure else None
            bad = None
            try:
                if tracker:
                    tracker.__enter__()
                loss = one_step(model, c, batches, optimizer, params, lr, step)
                if not math.isfinite(loss):
                    bad = f"loss is {loss}"
            except NonFiniteGradient:
                bad = "a gradient is not finite"
            finally:
                if tracker:
                    tracker.__exit__(None, None, None)
            seconds = time.perf_counter() - t0
            if bad:
                where = (f"the last good checkpoint is {last_good}" if last_good
                         else "no checkpoint had been written yet")
                raise MespError(f"step {step + 1}: {bad}; training stopped, {where}")
            step += 1
            micro_batches += c.grad_accum
            tokens = sum(b.n_tokens for b in batches)
            tokens_run += tokens
            record = {"step": step, "loss": loss, "lr": lr, "tokens": tokens,
                      "trained_tokens": sum(b.n_targets for b in batches), "seconds": round(seconds, 6),
                      "tokens_per_s": tokens / seconds if seconds > 0 else None,
                      "epoch": micro_batches / stream.per_epoch, "peak_rss_bytes": peak_rss_bytes()}
            if tracker:
                record["peak_bytes"] = tracker.peak_bytes
            if valid is not None and (step % c.eval_every == 0 or step == total_steps):
                valid_loss = record["valid_loss"] = evaluate(model, valid, c.batch_size)
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            if progress:
                progress({"event": "step", "total_steps": total_steps, **record})
            if step % c.save_every == 0 or step == total_steps:
                last_good = save_checkpoint(out, model, optimizer, trainer_state())
                if progress:
                    progress({"event": "checkpoint", "step": step, "path": str(last_good)})
    if step == resumed_from and ckpt is not None and valid is not None:
        valid_loss = evaluate(model, valid, c.batch_size)
    save_adapter(model, out)
    return TrainResult(out=str(out), steps=step, total_steps=total_steps, resumed_from=resumed_from, loss=loss,
                       valid_loss=valid_loss, n_samples=len(data), n_truncated=data.n_truncated, tokens=tokens_run,
                       seconds=time.perf_counter() - started, config=c.to_dict())


def one_step(model, c: TrainConfig, batches, optimizer, params: dict, lr: float, step: int) -> float:
    """One optimizer step over the micro-batches of `batches`. Returns the step's mean loss per label."""
    if c.method == "mezo":
        (b,) = batches
        prepared = prepare_batch(model, b.input_ids, b.labels, b.attention_mask)
        return mezo.update(model, prepared, lr, seed=mix_seed(c.seed, step), eps=c.mezo_eps,
                           weight_decay=c.weight_decay)
    normalizer = float(sum(b.n_targets for b in batches))
    if c.per_layer_update:
        (b,) = batches

        def update_layer(_, grads):
            require_finite(grads)
            for key, g in grads.items():
                optimizer.update(key, params[key], g, lr)

        loss, _ = compute_gradients(model, b.input_ids, b.labels, b.attention_mask, method="mesp",
                                    normalizer=normalizer, on_layer_grads=update_layer)
        return float(loss)
    total_loss, total = 0.0, None
    for b in batches:
        loss, grads = compute_gradients(model, b.input_ids, b.labels, b.attention_mask, method=c.method,
                                        normalizer=normalizer)
        total_loss += float(loss)
        if total is None:
            total = grads
        else:
            for key, g in grads.items():
                total[key].add_(g)
    if not math.isfinite(total_loss):
        return total_loss
    require_finite(total)
    if c.max_grad_norm is not None:
        clip_grad_norm(total, c.max_grad_norm)
    optimizer.step(params, total, lr)
    return total_loss


def require_finite(grads: dict[str, torch.Tensor]) -> None:
    for g in grads.values():
        if not bool(torch.isfinite(g).all()):
            raise NonFiniteGradient
