"""LoRA fine-tuning on a data file (JSONL, Parquet, CSV) or datasets directory: `train(TrainConfig(model=..., data=..., out=...))`.

The settings are mesp.train_config's TrainConfig; what the run writes into its directory, and how a checkpoint
is made, is mesp.checkpoint's. Nothing random is drawn from a global stream: the LoRA init, each epoch's data
order and MeZO's directions are functions of the seed (and epoch or step), so `resume` from a checkpoint
continues exactly the uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import MEMORY_SUMMARY, METRICS, OPTIMIZER_STATE, RUN_CONFIG, TRAINER_STATE, check_out_dir, clear_run, \
    read_metrics, remove_stray_temporaries, run_files, save_checkpoint
from .data import Dataset, MicroBatchStream, check_data, load_data
from .errors import MespError
from .fileio import write_json, write_text
from .interrupt import StopRequest
from .loaders import load_model
from .lora import adapter_state, add_lora, load_adapter, naming_fields, save_adapter
from .memory import RUNTIME_FLOOR_LABEL, FootprintMeter, PeakMemory, peak_rss_bytes, runtime_floor_bytes, stage
from .methods import compute_gradients, mezo
from .methods.common import forward_loss, prepare_batch
from .optim import clip_grad_norm, learning_rate, squared_norm
from .scratch import require_scratch_directory
from .seeds import mix_seed
from .tokenizer import load_tokenizer
from .report_to import metric_writer
from .tables import data_sha256
from .train_config import DEFAULT_LR, TrainConfig, engine_options, lora_config, optimizer_of, resolve

# TrainConfig, resolve and DEFAULT_LR are re-exported: mesp.train is where users find them
__all__ = ["DEFAULT_LR", "NonFiniteGradient", "TrainConfig", "TrainResult", "TrainingInterrupted", "evaluate",
           "one_step", "resolve", "train"]

log = logging.getLogger(__name__)


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
    n_skipped: int = 0  # samples longer than seq_len left out (long_samples skip)
    memory: dict = field(default_factory=dict)  # the run's memory summary (see train; also OUT/memory.json)


# ---- evaluation -------------------------------------------------------------------------------------------

def evaluate(model, dataset: Dataset, batch_size: int) -> float:
    """Mean loss per labelled token over the whole dataset (no gradient, chunked LM head)."""
    total = 0.0
    for b in dataset.batches_in_order(batch_size):
        # normalizer 1: forward_loss returns the sum over the batch's labelled tokens
        total += forward_loss(model, prepare_batch(model, b.input_ids, b.labels, b.attention_mask, normalizer=1.0))
    return total / dataset.n_targets


# ---- the loop ---------------------------------------------------------------------------------------------

class NonFiniteGradient(Exception):
    pass


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped training at a step boundary, after a checkpoint of that step was written: the run
    in `out` continues with `resume` (no final adapter is written)."""

    def __init__(self, signum: int, step: int, total_steps: int, checkpoint: Path, out: Path):
        super().__init__(f"interrupted at step {step}/{total_steps}; checkpoint {checkpoint}")
        self.signum, self.step, self.total_steps, self.checkpoint, self.out = signum, step, total_steps, checkpoint, out


def train(config: TrainConfig, progress: Callable[[dict], None] | None = None) -> TrainResult:
    """Fine-tune LoRA on config.data and write the run into config.out (see the module docstring).

    progress(event) is called with {"event": "start", ...} once, {"event": "step", **metrics} after every step
    and {"event": "checkpoint", ...} after each checkpoint. A SIGINT or SIGTERM during the steps (in the main
    thread) stops at the next step boundary with a checkpoint of it and raises TrainingInterrupted; a second
    one raises KeyboardInterrupt at once (see mesp.interrupt).

    The whole run is measured as a device would measure it (mesp.memory.FootprintMeter): its private-footprint
    and RSS peaks, overall and per stage (load, forward, loss, backward, update), beside the runtime floor
    (Python + torch) and, with measure_memory (always on CUDA), the largest allocator peak of a step above its
    start. They go into TrainResult.memory and OUT/memory.json; each step's metrics line carries the private
    peak so far."""
    c = resolve(config)
    out = Path(c.out)
    ckpt = check_out_dir(c)
    if c.scratch_dir is not None:
        require_scratch_directory(c.scratch_dir)  # before anything is loaded or written
    for path in (c.data, c.valid) if c.valid else (c.data,):
        check_data(path, c.columns())  # bad data is reported before the model loads
    # the floor is measured in a subprocess: started now, it costs no wall time; its memory is not ours
    floor = threading.Thread(target=runtime_floor_bytes, name="mesp-runtime-floor", daemon=True)
    floor.start()
    with FootprintMeter() as meter:
        result = _train(c, out, ckpt, meter, progress)
    floor.join()
    result.memory = {**meter.summary(), "step_allocator_peak_bytes": result.memory.get("step_allocator_peak_bytes"),
                     "runtime_floor_bytes": runtime_floor_bytes(), "runtime_floor_label": RUNTIME_FLOOR_LABEL}
    write_json(out / MEMORY_SUMMARY, result.memory)
    return result


def _train(c: TrainConfig, out: Path, ckpt: Path | None, meter: FootprintMeter, progress) -> TrainResult:
    device = c.device if c.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    with stage("load"):
        model = load_model(c.model, dtype=c.dtype, device=device, quantize=c.quantize, weights=c.weights)
    max_pos = model.config.max_position_embeddings
    if c.seq_len > max_pos:
        raise MespError(f"seq_len {c.seq_len} exceeds the model's max_position_embeddings {max_pos}")
    read = dict(get_tokenizer=lambda: load_tokenizer(model), seq_len=c.seq_len, train_on_prompt=c.train_on_prompt,
                vocab_size=model.config.vocab_size, long_samples=c.long_samples, columns=c.columns())
    data = load_data(c.data, **read)
    valid = load_data(c.valid, **read) if c.valid else None
    if data.n_truncated:
        log.warning("%d of %d training samples were longer than seq_len %d and were truncated",
                    data.n_truncated, len(data), c.seq_len)
    if data.n_skipped:
        log.warning("%d of %d training samples were longer than seq_len %d and were skipped",
                    data.n_skipped, len(data) + data.n_skipped, c.seq_len)
    data_sha = data_sha256(c.data)

    stream = MicroBatchStream(len(data), c.batch_size, c.seed)
    total_steps = c.steps if c.steps is not None else c.epochs * stream.steps_per_epoch(c.grad_accum)
    with naming_fields(r="rank"):  # a rank the model cannot hold is the --rank setting's error
        add_lora(model, lora_config(c), seed=c.seed)
    optimizer = None if c.method == "mezo" else optimizer_of(c)
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
        remove_stray_temporaries(out)
        metrics_lines = read_metrics(out / METRICS, step)
        log.info("resuming %s from step %d", out, step)
    elif run_files(out):
        clear_run(out)  # overwrite: only now that every input has been checked
    resumed_from = step

    write_json(out / RUN_CONFIG, c.to_dict())
    write_text(out / METRICS, "".join(line + "\n" for line in metrics_lines))
    if progress:
        progress({"event": "start", "total_steps": total_steps, "start_step": step, "n_samples": len(data),
                  "n_truncated": data.n_truncated, "n_skipped": data.n_skipped,
                  "device": device})

    def trainer_state() -> dict:
        return {"step": step, "micro_batches": micro_batches, "epoch": micro_batches // stream.per_epoch,
                "position_in_epoch": micro_batches % stream.per_epoch, "seed": c.seed, "data_sha256": data_sha,
                "total_steps": total_steps}

    last_good = ckpt
    loss = valid_loss = None
    tokens_run, started, step_peak = 0, time.perf_counter(), None
    measure = c.measure_memory or torch.device(device).type == "cuda"
    with open(out / METRICS, "a") as metrics_file, metric_writer(c.report_to, out, step) as viewer, \
            StopRequest() as stop:
        while step < total_steps:
            lr = learning_rate(step, c.lr, total_steps, c.schedule, c.warmup)
            batches = [data.collate(stream.indices(m)) for m in stream.step(micro_batches, c.grad_accum)]
            t0 = time.perf_counter()
            tracker = PeakMemory(device) if measure else None
            bad = None
            try:
                if tracker:
                    tracker.__enter__()
                loss = one_step(model, c, batches, optimizer, params, lr, step, stats := {})
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
            micro_batches += len(batches)
            tokens = sum(b.n_tokens for b in batches)
            tokens_run += tokens
            record = {"step": step, "loss": loss, "lr": lr, "tokens": tokens,
                      "trained_tokens": sum(b.n_targets for b in batches), "seconds": round(seconds, 6),
                      "tokens_per_s": tokens / seconds if seconds > 0 else None,
                      "epoch": micro_batches / stream.per_epoch, "peak_rss_bytes": peak_rss_bytes(),
                      "private_peak_bytes": meter.private_peak_bytes, **stats}
            if tracker:
                record["peak_bytes"] = tracker.peak_bytes
                step_peak = max(step_peak or 0, tracker.peak_bytes)
            if valid is not None and (step % c.eval_every == 0 or step == total_steps):
                valid_loss = record["valid_loss"] = evaluate(model, valid, c.batch_size)
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            viewer.write(record)
            if progress:
                progress({"event": "step", "total_steps": total_steps, **record})
            stopping = stop.signum is not None and step < total_steps  # a finished run just finishes
            if step % c.save_every == 0 or step == total_steps or stopping:
                last_good = save_checkpoint(out, model, optimizer, trainer_state())
                if progress:
                    progress({"event": "checkpoint", "step": step, "path": str(last_good)})
            if stopping:
                raise TrainingInterrupted(stop.signum, step, total_steps, last_good, out)
    if step == resumed_from and ckpt is not None and valid is not None:
        valid_loss = evaluate(model, valid, c.batch_size)
    save_adapter(model, out)
    return TrainResult(out=str(out), steps=step, total_steps=total_steps, resumed_from=resumed_from, loss=loss,
                       valid_loss=valid_loss, n_samples=len(data), n_truncated=data.n_truncated,
                       n_skipped=data.n_skipped, tokens=tokens_run,
                       seconds=time.perf_counter() - started, config=c.to_dict(),
                       memory={"step_allocator_peak_bytes": step_peak})


def one_step(model, c: TrainConfig, batches, optimizer, params: dict, lr: float, step: int,
             stats: dict | None = None) -> float:
    """One optimizer step over the micro-batches of `batches`. Returns the step's mean loss per label; `stats`,
    when given, receives the step's global gradient norm before clipping ("grad_norm"; not for MeZO, which has
    no gradient)."""
    stats = {} if stats is None else stats
    options = engine_options(c, model.config, str(model.dtype).removeprefix("torch."))
    if c.method == "mezo":
        (b,) = batches
        prepared = prepare_batch(model, b.input_ids, b.labels, b.attention_mask)
        return mezo.update(model, prepared, lr, seed=mix_seed(c.seed, step), eps=c.mezo_eps,
                           weight_decay=c.weight_decay, **options)
    normalizer = float(sum(b.n_targets for b in batches))
    if c.per_layer_update:
        (b,) = batches

        squares = 0.0

        def update_layer(_, grads):
            nonlocal squares
            require_finite(grads)
            squares += squared_norm(grads)
            with stage("update"):
                for key, g in grads.items():
                    optimizer.update(key, params[key], g, lr)

        loss, _ = compute_gradients(model, b.input_ids, b.labels, b.attention_mask, method="mesp",
                                    normalizer=normalizer, offload_checkpoints=scratch_directory(c),
                                    on_layer_grads=update_layer, **options)
        stats["grad_norm"] = math.sqrt(squares)
        return float(loss)
    total_loss, total = 0.0, None
    for b in batches:
        loss, grads = compute_gradients(model, b.input_ids, b.labels, b.attention_mask, method=c.method,
                                        normalizer=normalizer, offload_checkpoints=scratch_directory(c),
                                        **options)
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
        stats["grad_norm"] = clip_grad_norm(total, c.max_grad_norm)
    else:
        stats["grad_norm"] = math.sqrt(squared_norm(total))
    with stage("update"):
        optimizer.step(params, total, lr)
    return total_loss


def scratch_directory(c: TrainConfig) -> str | None:
    """Where the activation checkpoints' scratch file goes: None (RAM), --scratch-dir, or the run directory."""
    if not c.offload_checkpoints:
        return None
    return c.scratch_dir or c.out


def require_finite(grads: dict[str, torch.Tensor]) -> None:
    for g in grads.values():
        if not bool(torch.isfinite(g).all()):
            raise NonFiniteGradient
