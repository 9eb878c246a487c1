"""The run directory of `mesp.train`: what a run writes, its checkpoints, and the rules for reusing it.

The run directory OUT holds, once training ends:
    adapter_config.json, adapter_model.safetensors    the final adapter (PEFT format)
    train_config.json                                 the resolved settings of the run
    metrics.jsonl                                     one JSON object per step
    memory.json                                       the run's memory peaks (private footprint, RSS, ...)
    checkpoint-NNNNNN/                                the latest checkpoint: adapter, optimizer.safetensors,
                                                      trainer_state.json (step, data position, seeds)
    checkpoint.json                                   which checkpoint is the latest (written last)

A checkpoint is written into a temporary directory (.checkpoint-NNNNNN.tmp), renamed into place, and only then
named in checkpoint.json, so a crash leaves the previous checkpoint intact. Files are written through
mesp.fileio.atomic_write, whose temporaries are named .NAME.<random>.tmp. A crash or a second Ctrl-C can leave
such temporaries behind; resume sweeps them. Only these exact names count as the run's: a user's own file in the
directory (checkpoint-notes.txt, say) is never touched, not even by --overwrite.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from pathlib import Path

from .errors import MespError
from .fileio import fsync_dir, write_json
from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_adapter
from .train_config import SAME_RUN_KEYS, TrainConfig

log = logging.getLogger(__name__)

RUN_CONFIG = "train_config.json"
METRICS = "metrics.jsonl"
MEMORY_SUMMARY = "memory.json"  # the run's memory peaks (mesp.train), written at its end
LATEST = "checkpoint.json"
OPTIMIZER_STATE = "optimizer.safetensors"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"
RUN_FILE_NAMES = (RUN_CONFIG, METRICS, MEMORY_SUMMARY, LATEST, ADAPTER_CONFIG, ADAPTER_WEIGHTS)
CHECKPOINT_NAME = re.compile(re.escape(CHECKPOINT_PREFIX) + r"[0-9]+")
# a checkpoint directory being written, and atomic_write's temporary for each file the run writes
TEMPORARY_NAME = re.compile(r"\.(?:" + re.escape(CHECKPOINT_PREFIX) + r"[0-9]+|(?:"
                            + "|".join(map(re.escape, RUN_FILE_NAMES)) + r")\.[^/]+)\.tmp")


def run_files(out: Path) -> list[Path]:
    """The files, checkpoints and temporaries a run writes that exist in `out` (exact names only)."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.name in RUN_FILE_NAMES or CHECKPOINT_NAME.fullmatch(p.name)
                  or TEMPORARY_NAME.fullmatch(p.name))


def stray_temporaries(out: Path) -> list[Path]:
    """Temporaries an interrupted run left in `out`: checkpoints cut short and atomic_write's leftovers."""
    return sorted(p for p in out.iterdir() if TEMPORARY_NAME.fullmatch(p.name)) if out.is_dir() else []


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
    # resume and overwrite say how to open the run, not what the run is
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"resume", "overwrite"}
    return {k: v for k, v in saved.items() if k in known}


def check_out_dir(c: TrainConfig) -> Path | None:
    """Refuse an out directory holding another run unless resuming or overwriting. Returns the checkpoint to
    resume from (None for a fresh run). Nothing is written or deleted here."""
    out = Path(c.out)
    if out.exists() and not out.is_dir():
        raise MespError(f"out {out}: exists and is not a directory")
    check_can_create(out)
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


def _remove(paths) -> None:
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def check_can_create(out: Path) -> None:
    """Refuse, before anything is loaded, an out directory that cannot be written or created: a file where a
    parent directory should be, or a directory without write permission."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != out and not existing.is_dir():
        raise MespError(f"out {out}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MespError(f"out {out}: {existing} is not writable")


def clear_run(out: Path) -> None:
    """Delete what a previous run wrote in `out` (and nothing else)."""
    _remove(run_files(out))


def remove_stray_temporaries(out: Path) -> None:
    """Delete what an interruption left under temporary names (see stray_temporaries)."""
    stray = stray_temporaries(out)
    if stray:
        log.info("removing %d temporaries of an interrupted run in %s", len(stray), out)
    _remove(stray)


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
    fsync_dir(out)  # the checkpoint's name is durable before LATEST points at it
    write_json(out / LATEST, {"checkpoint": name, "step": state["step"]})
    for p in out.iterdir():
        if p.is_dir() and CHECKPOINT_NAME.fullmatch(p.name) and p.name != name:
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
