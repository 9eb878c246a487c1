"""A trained LoRA adapter as GGUF, the format llama.cpp, Ollama and the apps built on them read.

    export_gguf_lora("smollm2-135m-instruct", "runs/me", "adapter.gguf")   llama-cli -m base.gguf --lora adapter.gguf
    merge_gguf("smollm2-135m-instruct", "runs/me", "merged.gguf", "q8_0")  llama-cli -m merged.gguf

The LoRA file is what llama.cpp's convert_lora_to_gguf.py writes: general.type "adapter", adapter.type "lora",
adapter.lora.alpha, the base model's general.architecture, and for every projection two tensors named after
the base model's GGUF tensor, `<name>.lora_a` and `<name>.lora_b`. Their orientation is PEFT's: lora_a holds A
[r, in] and lora_b holds B [out, r] (GGUF lists dims fastest-first: [in, r] and [r, out], the shapes llama.cpp
checks against the base tensor). llama.cpp adds scale * (alpha / r) * B (A x), PEFT's update for scale 1. For
llama-style models (whose q/k rows convert_hf_to_gguf permutes for llama.cpp's rope) the rows of q_proj's and
k_proj's B are permuted the same way, so B A lands on the permuted rows of the base tensor.

The merged model is a complete GGUF: every base weight with (alpha / r) B A folded in, computed one block of rows
at a time, written block by block and atomically by mesp.formats.gguf_writer; its metadata is a GGUF source's
own (tokenizer and chat template included) or, for other sources, the configuration's (such files carry no
tokenizer: see mesp.quantize).
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from .errors import MespError
from .families import ModelConfig
from .formats.gguf import open_gguf, permuted_heads
from .formats.gguf_writer import (OUT_TYPES, TensorPlan, add_config_metadata, add_file_type, extra_tensors,
                                  gguf_arch, hf_to_gguf_name, model_plan, tensor_type)
from .loaders import resolve_source, source_config
from .lora import load_adapter, lora_modules
from .merge import load_for_merge
from .model import Model
from .quantize import check_out_file, copy_metadata, write_gguf_file

log = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
LORA_OUT_TYPES = ("f32", "f16", "q8_0")  # convert_lora_to_gguf's --outtype choices
MERGE_OUT_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")
FORMATS = ("gguf-lora", "executorch")


def export_arguments(p: argparse.ArgumentParser) -> None:
    """`mesp export`'s flags."""
    p.add_argument("--model", required=True, help="the base model the adapter was trained on: HF directory, "
                   ".gguf file or preset")
    p.add_argument("--adapter", help="LoRA adapter directory (PEFT format), e.g. a mesp train --out (gguf-lora: "
                   "required; executorch: the adapter training starts from, else a fresh one)")
    p.add_argument("--format", choices=FORMATS, default="gguf-lora", help="what to write: llama.cpp's LoRA "
                   "adapter file, or executorch: one MeSP training step as an ExecuTorch program, DIR/step.pte "
                   "+ DIR/base.ptd (the frozen weights), which mesp-runner runs (default gguf-lora)")
    p.add_argument("--outtype", choices=LORA_OUT_TYPES, default="f32", help="type of the LoRA matrices (q8_0 "
                   "falls back to f16 for a matrix whose rows do not split into blocks of 32; default f32)")
    p.add_argument("--out", required=True, metavar="FILE.gguf|DIR", help="the .gguf file to write (executorch: "
                   "the directory)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    g = p.add_argument_group("--format executorch (the step's fixed shapes and settings)")
    g.add_argument("--rank", type=int, default=8, help="LoRA rank of a fresh adapter (default 8)")
    g.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha of a fresh adapter (default 16)")
    g.add_argument("--seed", type=int, default=0, help="a fresh adapter's init (default 0)")
    g.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    g.add_argument("--batch-size", type=int, default=1, help="sequences per step (default 1)")
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", help="the update, at a constant lr "
                   "(adamw: mesp train's betas and eps; default sgd)")
    g.add_argument("--lr", type=float, default=None, help="learning rate, constant (default mesp train's: 0.1 sgd, "
                   "0.001 adamw)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="weight decay, decoupled for adamw (default 0)")
    g.add_argument("--quantize", choices=("none", "int8"), default="none", help="the frozen matrices in "
                   "base.ptd: int8 per output channel (the values of mesp train --quantize int8), a quarter of "
                   "fp32's bytes, dequantized inside the step a block of rows at a time (default none: fp32)")
    g.add_argument("--data", metavar="FILE|DIR", help="training data (any mesp train --data source), also written "
                   "as DIR/tokens.bin, the runner's --data: each sample cut to --seq-len, right-padded, pads "
                   "labelled -100")


def merge_format_arguments(p: argparse.ArgumentParser) -> None:
    """`mesp merge`'s --format and --quantize."""
    p.add_argument("--format", choices=("hf", "gguf"), default="hf", help="hf: a transformers directory; gguf: "
                   "one GGUF file that llama.cpp and Ollama run (default hf)")
    p.add_argument("--quantize", choices=MERGE_OUT_TYPES, default="f16", help="with --format gguf: type of the "
                   "merged matrices (norms and biases stay f32; default f16)")


@dataclass
class ExportResult:
    out: str
    outtype: str
    tensors: int
    bytes: int
    lora_modules: int  # projections carrying LoRA (merge_gguf: folded in)


@dataclass
class BaseModel:
    """What an export needs of the base model without loading its weights."""
    config: ModelConfig
    arch: str  # llama.cpp's general.architecture
    gguf_path: Path | None  # the base GGUF file, when it is one
    inputs: list[Path]  # files an --out must not replace


def base_model(source) -> BaseModel:
    """The base model's configuration and architecture, read from its config.json, GGUF header or preset."""
    src = os.fspath(source)
    form, path = resolve_source(src)
    reader = open_gguf(path) if form == "gguf" else None
    cfg = source_config(src, form, path, reader)
    if form == "random":
        return BaseModel(cfg, gguf_arch(cfg.arch), None, [])
    if form == "hf":
        return BaseModel(cfg, gguf_arch(cfg.arch), None, [path / "config.json"])
    return BaseModel(cfg, reader.metadata("general.architecture"), path, [path])


def _rows(a: np.ndarray):
    return lambda n0, n1: a[n0:n1]


def lora_plans(model: Model, outtype: str) -> list[TensorPlan]:
    """The .lora_a / .lora_b tensors of every projection of `model` carrying LoRA, in module order."""
    cfg, target = model.config, OUT_TYPES[outtype]
    plans = []
    for name, proj in lora_modules(model).items():
        base = hf_to_gguf_name(f"{name}.weight", cfg.arch)
        a = proj.lora_A.detach().to(torch.float32).numpy()  # [r, in]
        b = proj.lora_B.detach().to(torch.float32).numpy()  # [out, r]
        for suffix, m, heads in ((".lora_a", a, None), (".lora_b", b, permuted_heads(cfg, f"{name}.weight"))):
            plans.append(TensorPlan(base + suffix, m.shape, _rows(m), permute_heads=heads,
                                    qtype=tensor_type(m.shape, target, fallback=Q.F16)))
    return plans


def export_gguf_lora(model_source, adapter_dir, out, outtype: str = "f32", overwrite: bool = False) -> ExportResult:
    """Write the PEFT adapter in `adapter_dir`, trained on `model_source` (HF directory, .gguf file or preset),
    as llama.cpp's LoRA GGUF file `out` (see the module docstring). Every adapter tensor is checked against the
    base model's shapes first; `out` is written atomically and replaced only with overwrite=True."""
    if outtype not in LORA_OUT_TYPES:
        raise MespError(f"--outtype: unknown {outtype!r}; choose from {', '.join(LORA_OUT_TYPES)}")
    out = Path(out).expanduser()
    base = base_model(model_source)
    model = Model(base.config)  # empty weights: the adapter's shapes are checked against the module tree
    load_adapter(model, adapter_dir)
    adapter = Path(adapter_dir).expanduser()
    check_out_file(out, [*base.inputs, *adapter.glob("*")], overwrite)
    plans = lora_plans(model, outtype)
    alpha = float(model.lora_config.alpha)

    def add_metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        add_file_type(writer, OUT_TYPES[outtype])

    size = write_gguf_file(out, base.arch, add_metadata, plans, OUT_TYPES[outtype])
    log.info("%s: LoRA of %d projections (r=%d, alpha=%g) as %d %s tensors, %d bytes", out, len(plans) // 2,
             model.lora_config.r, alpha, len(plans), outtype, size)
    return ExportResult(str(out), outtype, len(plans), size, len(plans) // 2)


def _merged_rows(w, proj):
    """read_rows of base weight `w` with the LoRA update of `proj` (or none) folded in, in fp32."""
    a = b = None
    if proj is not None:
        a = proj.lora_A.detach().to(torch.float32)
        b = proj.scale * proj.lora_B.detach().to(torch.float32)

    def read_rows(n0, n1):
        rows = w[n0:n1].to(torch.float32) if isinstance(w, torch.Tensor) else w.dense_rows(n0, n1, torch.float32)
        return rows if a is None else rows + b[n0:n1] @ a
    return read_rows


def merge_gguf(model_source, adapter_dir, out, quantize: str = "f16", overwrite: bool = False) -> ExportResult:
    """Fold the PEFT adapter in `adapter_dir` into `model_source` and write the merged model as a complete GGUF
    file `out`, its matrices in `quantize` (f32, f16, q8_0, q4_0 or q4_1; norms and biases F32). The source
    stays quantized or on disk; each weight is merged and written one block of rows at a time."""
    if quantize not in MERGE_OUT_TYPES:
        raise MespError(f"--quantize: unknown {quantize!r}; choose from {', '.join(MERGE_OUT_TYPES)}")
    target = OUT_TYPES[quantize]
    out = Path(out).expanduser()
    base = base_model(model_source)
    adapter = Path(adapter_dir).expanduser()
    check_out_file(out, [*base.inputs, *adapter.glob("*")], overwrite)
    model = load_for_merge(model_source)
    load_adapter(model, adapter_dir)
    cfg = model.config
    lora = {f"{name}.weight": proj for name, proj in lora_modules(model).items()}
    plans = [model_plan(cfg, name, w.shape, _merged_rows(w, lora.get(name))) for name, w in model.base_weights()]
    plans += extra_tensors(cfg)
    if base.gguf_path is not None:
        reader = open_gguf(base.gguf_path)

        def add_metadata(writer):
            copy_metadata(writer, reader, target, str(base.gguf_path))
    else:
        def add_metadata(writer):
            add_config_metadata(writer, cfg, target)
    size = write_gguf_file(out, base.arch, add_metadata, plans, target)
    log.info("%s: merged %d LoRA projections, %d tensors (%s), %d bytes", out, len(lora), len(plans), quantize, size)
    return ExportResult(str(out), quantize, len(plans), size, len(lora))
