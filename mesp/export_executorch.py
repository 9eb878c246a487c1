"""The MeSP training step as an ExecuTorch program: `mesp export --format executorch` and the module it exports.

    mesp export --format executorch --model qwen2.5-0.5b --rank 8 --seq-len 256 --out et/
    runner/build: mesp-runner et/step.pte et/base.ptd --data tokens.bin --steps 5 --out adapter.safetensors

TrainingStep is an nn.Module whose forward is one whole SGD step of MeSP, run by the engine itself
(mesp.methods.mesp.gradients: the forward keeping only layer inputs, the per-layer recompute, the hand-derived
backward, the chunked LM-head loss) followed by the update p - lr * g. Nothing in it uses autograd, so the step
is an ordinary forward program that torch.export traces and ExecuTorch runs:

    forward(input_ids [B, T] int64, *lora) -> (loss fp32 [], *updated lora)

lora: every LoRA tensor in LORA order (lora_names: PEFT keys, lora_A then lora_B per projection). The host
keeps them and feeds each step's outputs back as the next step's inputs. Shapes are fixed at export: B, T, and
every position is labelled (labels = input_ids, the loss predicting token t+1 at position t, divided by
B * (T - 1)), so the counted rows of the loss are a constant and no data-dependent shape is traced.

The frozen base weights are the module's buffers: exported as constants, written by to_executorch with
external_constants into base.ptd, which the runtime memory-maps (file-backed pages, not private memory).
The program's second method `initial_lora` returns the adapter's initial tensors (A random, B zero, as
mesp.add_lora makes them), so a runner needs nothing but the two files. The PEFT keys and the LoRA config
travel as constant methods (`lora_names`: the keys joined by newlines; `adapter_config`: PEFT's JSON).

ExecuTorch itself lives in an environment of its own (.et/, made by scripts/dev.sh runner): torch.export of
the step needs only torch; to_edge / to_executorch import executorch lazily.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import tempfile
from pathlib import Path

import torch
from torch import nn

from .data import IGNORE
from .errors import MespError
from .fileio import atomic_write, fsync_file
from .lora import peft_key
from .methods.common import LossBatch
from .methods.mesp import gradients

log = logging.getLogger(__name__)

PROGRAM_FILE, WEIGHTS_FILE = "step.pte", "base.ptd"
OPTIMIZERS = ("sgd",)


class TrainingStep(nn.Module):
    """One MeSP SGD step of `model` (with its LoRA added) on a fixed [batch, seq_len] token batch."""

    def __init__(self, model, batch: int, seq_len: int, lr: float, **engine_options):
        super().__init__()
        if seq_len < 2:
            raise MespError(f"seq_len: {seq_len} leaves no token to predict; use at least 2")
        self.model, self.batch, self.seq_len, self.lr = model, batch, seq_len, float(lr)
        self.engine_options = engine_options
        self.lora_paths = list(model.lora_parameters())
        if not self.lora_paths:
            raise MespError("the model has no LoRA adapter: call mesp.add_lora first")
        self.lora_names = [peft_key(p) for p in self.lora_paths]
        # every position but each row's last predicts the next token: fixed flat row indices of the loss
        rows = torch.arange(batch * seq_len, device=model.device).view(batch, seq_len)[:, :-1].reshape(-1)
        self.register_buffer("counted_rows", rows, persistent=False)

    def initial_lora(self) -> list[torch.Tensor]:
        """The LoRA tensors the model holds now, in lora_names order (copies)."""
        params = self.model.lora_parameters()
        return [params[p].detach().clone() for p in self.lora_paths]

    def forward(self, input_ids: torch.Tensor, *lora: torch.Tensor):
        if len(lora) != len(self.lora_paths):
            raise MespError(f"expected {len(self.lora_paths)} LoRA tensors, got {len(lora)}")
        targets = torch.full_like(input_ids, IGNORE)
        targets[:, :-1] = input_ids[:, 1:]
        batch = LossBatch(input_ids, None, targets, float(self.batch * (self.seq_len - 1)), self.counted_rows)
        modules = dict(self.model.named_modules())
        held = []
        try:  # the step's LoRA tensors take the parameters' place for the engine (restored after)
            for path, t in zip(self.lora_paths, lora):
                owner, attr = path.rsplit(".", 1)
                held.append((modules[owner], attr, modules[owner]._parameters[attr]))
                modules[owner]._parameters[attr] = t  # a plain tensor: setattr accepts only a Parameter
            loss, grads = gradients(self.model, batch, **self.engine_options)
        finally:
            for module, attr, value in held:
                module._parameters[attr] = value
        updated = [t - self.lr * grads[name] for name, t in zip(self.lora_names, lora)]
        return (loss, *updated)


class InitialLora(nn.Module):
    """The program's `initial_lora` method: the adapter's starting tensors, as constants."""

    def __init__(self, tensors: list[torch.Tensor]):
        super().__init__()
        for i, t in enumerate(tensors):
            self.register_buffer(f"t{i}", t)
        self.n = len(tensors)

    def forward(self):
        return tuple(getattr(self, f"t{i}").clone() for i in range(self.n))


def export_step(step: TrainingStep):
    """torch.export of the step's forward and of its initial_lora method: {method name: ExportedProgram}."""
    ids = torch.zeros(step.batch, step.seq_len, dtype=torch.long, device=step.model.device)
    lora = step.initial_lora()
    with torch.no_grad():
        forward = torch.export.export(step, (ids, *lora), strict=False)
        initial = torch.export.export(InitialLora(lora), (), strict=False)
    return {"forward": forward, "initial_lora": initial}


def to_executorch_program(programs: dict, constant_methods: dict):
    """ExecuTorch's portable lowering (no delegate: XNNPACK would pack the frozen weights into private memory
    at load), every constant tagged for the external data file: an ExecutorchProgramManager."""
    try:
        from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge
    except ImportError as e:
        raise MespError("mesp export --format executorch needs ExecuTorch: run .et/bin/mesp "
                        "(scripts/dev.sh runner makes .et)") from e
    edge = to_edge(programs, constant_methods=constant_methods,
                   compile_config=EdgeCompileConfig(_check_ir_validity=False))
    return edge.to_executorch(ExecutorchBackendConfig(external_constants=lambda node: WEIGHTS_FILE[:-4]))


def export_executorch(model, out_dir, batch: int = 1, seq_len: int = 256, lr: float = 1e-3,
                      optimizer: str = "sgd", **engine_options) -> dict:
    """Write out_dir/step.pte and out_dir/base.ptd for `model` (with its LoRA added). Returns what was written."""
    if optimizer not in OPTIMIZERS:
        raise MespError(f"optimizer {optimizer}: the ExecuTorch step exports {', '.join(OPTIMIZERS)} only")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    step = TrainingStep(model, batch, seq_len, lr, **engine_options)
    lora_config = getattr(model, "lora_config", None)
    constants = {"lora_names": "\n".join(step.lora_names), "batch_size": batch, "seq_len": seq_len,
                 "adapter_config": json.dumps(lora_config.to_peft(model) if lora_config else {})}
    log.info("exporting the step (B=%d, T=%d, %d LoRA tensors)", batch, seq_len, len(step.lora_names))
    program = to_executorch_program(export_step(step), constants)
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as scratch:  # each file lands whole or not
        program.write_tensor_data_to_file(scratch)
        fsync_file(Path(scratch) / WEIGHTS_FILE)
        os.replace(Path(scratch) / WEIGHTS_FILE, out / WEIGHTS_FILE)

    def write_program(tmp):
        with open(tmp, "wb") as f:
            program.write_to_file(f)

    atomic_write(out / PROGRAM_FILE, write_program)
    return {"program": str(out / PROGRAM_FILE), "weights": str(out / WEIGHTS_FILE), "lora": step.lora_names}


TOKENS_MAGIC = b"MESPTOK1"


def write_tokens(path, input_ids: torch.Tensor) -> None:
    """The runner's tokens file (runner/main.cpp): TOKENS_MAGIC, rows and seq_len as little-endian int64, then
    the [rows, seq_len] token ids as little-endian int64; written atomically."""
    if input_ids.dim() != 2:
        raise MespError(f"tokens: expected [rows, seq_len], got shape {tuple(input_ids.shape)}")
    header = TOKENS_MAGIC + struct.pack("<qq", *input_ids.shape)
    body = input_ids.to(torch.int64).contiguous().numpy().astype("<i8").tobytes()
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(header + body))


def export_executorch_cli(args) -> dict:
    """`mesp export --format executorch`: the model with the given or a fresh adapter, exported."""
    from .loaders import load_model
    from .lora import LoraConfig, add_lora, load_adapter

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise MespError(f"--out {out}: not a directory")
    if not args.overwrite and any((out / f).exists() for f in (PROGRAM_FILE, WEIGHTS_FILE)):
        raise MespError(f"--out {out}: holds a {PROGRAM_FILE} already; pass --overwrite to replace it")
    for name in ("rank", "seq_len", "batch_size"):
        if getattr(args, name) < 1:
            raise MespError(f"--{name.replace('_', '-')}: expected a whole number >= 1, got {getattr(args, name)}")
    model = load_model(args.model, weights="resident")
    if args.adapter:
        load_adapter(model, args.adapter)
    else:
        add_lora(model, LoraConfig(r=args.rank, alpha=args.alpha), seed=args.seed)
    return export_executorch(model, out, args.batch_size, args.seq_len, args.lr, args.optimizer)
