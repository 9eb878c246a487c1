"""Fold a LoRA adapter into the base weights and write a Hugging Face model directory.

    merge_adapter("smollm2-135m-instruct", "runs/demo", "merged/")   # then AutoModelForCausalLM.from_pretrained

For every projection carrying LoRA, W' = W + (alpha / r) * B A, computed in fp32 one weight at a time and cast to
the output dtype. The source stays on disk (HF directory) or quantized (GGUF) until each weight's turn, when it
is dequantized to fp32; tensors stream into safetensors shards of at most `max_shard_bytes`, so about one shard
is ever held. Everything is written into a temporary directory beside `out_dir` and renamed into place at the
end: a failed merge leaves no partial model.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import MespError
from .fileio import fsync_dir, temp_dir, write_json
from .formats.safetensors import ShardWriter
from .loaders import DTYPES, load_model
from .lora import load_adapter, lora_modules
from .model import Model
from .presets import PRESETS
from .tokenizer import source_tokenizer

log = logging.getLogger(__name__)

OUT_DTYPES = ("float32", "bfloat16")  # names in mesp.loaders.DTYPES
DEFAULT_MAX_SHARD_BYTES = 2 << 30


@dataclass
class MergeReport:
    out_dir: str
    dtype: str
    merged_modules: int  # projections whose LoRA update was folded in
    tensors: int
    total_bytes: int
    shards: list[str] = field(default_factory=list)
    tokenizer: bool = False


def dense_weight(w) -> torch.Tensor:
    """An fp32 dense copy of a base weight; a quantized or on-disk weight (mesp.quant.FrozenWeight) is
    dequantized straight to fp32."""
    if isinstance(w, torch.Tensor):
        return w.to(torch.float32)
    return w.dequantize(torch.float32)


def merged_weights(model: Model, dtype: torch.dtype):
    """Yield (HF name, tensor in `dtype`) of every base weight, LoRA folded in; one weight in fp32 at a time."""
    lora = {f"{name}.weight": proj for name, proj in lora_modules(model).items()}
    for name, w in model.base_weights():
        t = dense_weight(w)
        proj = lora.get(name)
        if proj is not None:
            with torch.no_grad():
                t = t + proj.scale * (proj.lora_B.detach().to(torch.float32) @ proj.lora_A.detach().to(torch.float32))
        yield name, t.to(dtype)


def _check_out_dir(out: Path, overwrite: bool, inputs: list[Path]) -> None:
    """Refuse an --out that is, or holds, an input (replacing it would delete the model or the adapter being
    merged), that is a file, or that holds anything without --overwrite."""
    resolved = out.resolve()
    for p in inputs:
        if p.exists() and (resolved == p.resolve() or resolved in p.resolve().parents):
            raise MespError(f"--out {out}: holds {p}, an input of this merge; choose another directory")
    if out.exists():
        if not out.is_dir():
            raise MespError(f"--out {out}: exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise MespError(f"--out {out}: exists and is not empty (pass --overwrite to replace it)")


def _replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Put the finished `tmp` where `out` is. Without --overwrite an existing `out` must still be empty (something
    may have been written there while the merge ran): rmdir removes only an empty directory. With it, `out` is
    moved aside first and removed after, and the new directory keeps the old one's mode."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if not overwrite:
        try:
            out.rmdir()
        except OSError as e:
            raise MespError(f"--out {out}: is no longer empty (pass --overwrite to replace it)") from e
        os.replace(tmp, out)
        return
    os.chmod(tmp, out.stat().st_mode & 0o7777)
    old = temp_dir(out.parent, out.name, suffix=".old")
    os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old / out.name, out)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def load_for_merge(source) -> Model:
    """The base model with as little of it resident as its format allows: a HF directory's matrices stay in
    their files (lazy) and a GGUF file's Q4_0/Q4_1/Q8_0 matrices stay quantized, so merged_weights holds one
    weight in fp32 at a time. Random presets are built dense."""
    src = os.fspath(source)
    if src in PRESETS:
        return load_model(src, quantize="gguf" if PRESETS[src]["kind"] == "gguf" else None)
    if Path(src).expanduser().is_dir():
        return load_model(src, lazy=True)
    if src.lower().endswith(".gguf"):
        return load_model(src, quantize="gguf")
    return load_model(src)  # not a model: load_model says why


def merge_adapter(model_source, adapter_dir, out_dir, dtype: str = "float32", overwrite: bool = False,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> MergeReport:
    """Load `model_source` (HF dir, .gguf or preset) with the PEFT adapter in `adapter_dir`, fold the adapter
    into the weights and write a HF directory at `out_dir` (config.json, safetensors, tokenizer files if the
    model has a tokenizer) that transformers.AutoModelForCausalLM.from_pretrained loads."""
    if dtype not in OUT_DTYPES:
        raise MespError(f"--dtype: unknown {dtype!r}; choose from {', '.join(OUT_DTYPES)}")
    if max_shard_bytes < 1:
        raise MespError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    out = Path(out_dir).expanduser()
    inputs = [Path(os.fspath(adapter_dir)).expanduser(), Path(os.fspath(model_source)).expanduser()]
    _check_out_dir(out, overwrite, inputs)

    model = load_for_merge(model_source)
    load_adapter(model, adapter_dir)
    tokenizer = source_tokenizer(model)  # a broken one fails here, before anything is written

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out.parent, out.name)
    try:
        writer = ShardWriter(tmp, max_shard_bytes)
        count = 0
        for name, t in merged_weights(model, DTYPES[dtype]):
            writer.add(name, t)
            count += 1
        shards = writer.finish()
        hf = model.config.to_hf()
        hf.pop("torch_dtype", None)  # transformers 5 reads "dtype"; an older key from the source would contradict it
        hf["dtype"] = dtype
        write_json(tmp / "config.json", hf)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        fsync_dir(tmp)
        _check_out_dir(out, overwrite, inputs)  # again: the inputs or --out may have changed while we merged
        _replace_dir(tmp, out, overwrite)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    merged = len(lora_modules(model))
    log.info("merged %d LoRA projections into %d tensors (%d bytes, %d shard(s)) -> %s",
             merged, count, writer.total_bytes, len(shards), out)
    return MergeReport(out_dir=str(out), dtype=dtype, merged_modules=merged, tensors=count,
                       total_bytes=writer.total_bytes, shards=shards, tokenizer=tokenizer is not None)
