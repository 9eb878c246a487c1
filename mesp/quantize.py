"""`mesp quantize`: any model source to a GGUF file in Q4_0, Q4_1 or Q8_0 (or F16 / F32), never the whole model
in memory.

    quantize_model("path/to/hf_dir", "q4_0", "model.q4_0.gguf")     config.json + *.safetensors
    quantize_model("model.f16.gguf", "q8_0", "model.q8_0.gguf")     a GGUF file, re-quantized
    quantize_model("qwen2.5-0.5b", "q4_0", "q05.gguf")              a preset (random presets drawn as they load)

Every matrix whose input dimension is a multiple of 32 (projections, embedding, LM head) is stored in the
target type; norms, biases and other matrices stay F32 (mesp.formats.gguf_writer.tensor_type). Each tensor is
read, converted and written one block of rows at a time: a Hugging Face directory's matrices are read from
their safetensors files by rows, a GGUF source's from its memory map, a random preset's drawn row block by
row block with the seed load_model uses, so `load_model(out)` is the source model with its matrices
quantized.

Metadata: a GGUF source's metadata (tokenizer included) is copied, only general.file_type changing; for
other sources it is written from the model's configuration with llama.cpp's keys. A Hugging Face
directory's tokenizer is not converted (llama.cpp identifies a tokenizer's pre-tokenizer by a hash of its
output, which needs the tokenizer itself): such files load and train on pre-tokenized data, and
`mesp generate` needs the original directory's tokenizer.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from .errors import MespError, one_line
from .families import ModelConfig, expected_shapes
from .formats.gguf import ROPE_FREQS, gguf_config, gguf_to_hf_name, open_gguf
from .formats.gguf_writer import (OUT_TYPES, TensorPlan, add_config_metadata, add_file_type, extra_tensors,
                                  gguf_arch, model_plan, tensor_type, write_gguf)
from .formats.safetensors import INDEX_FILE, lazy_safetensors, safetensors_files
from .loaders import read_hf_config
from .presets import PRESETS, preset_gguf_path
from .random_init import random_weights

log = logging.getLogger(__name__)

# metadata a re-quantized GGUF file does not inherit: the reader's own header fields, what GGUFWriter writes
# itself, and what describes the old tensor data
_NOT_COPIED = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version",
               "general.alignment")


@dataclass
class QuantizeResult:
    out: str
    target: str
    bytes: int
    tensors: int
    quantized: int  # tensors stored in the target type; the others are F32


def quantize_model(source, to: str, out, overwrite: bool = False) -> QuantizeResult:
    """Write model `source` (HF directory, .gguf file or preset name) as a GGUF file `out` with its matrices in
    `to` ("q4_0", "q4_1", "q8_0", "f16" or "f32"). `out` is replaced only with overwrite=True, and never when
    it is one of the source's files."""
    if to not in OUT_TYPES:
        raise MespError(f"unknown quantization {to!r} (choose from {', '.join(OUT_TYPES)})")
    target = OUT_TYPES[to]
    out = Path(out).expanduser()
    src = os.fspath(source)
    if src in PRESETS and PRESETS[src]["kind"] == "random":
        arch, add_metadata, plans, inputs = _random_source(src, target)
    else:
        path = preset_gguf_path(src) if src in PRESETS else Path(src).expanduser()
        if path.is_dir():
            arch, add_metadata, plans, inputs = _hf_source(path, target)
        elif path.suffix.lower() == ".gguf" and path.is_file():
            arch, add_metadata, plans, inputs = _gguf_source(path, target)
        elif not path.exists():
            raise MespError(f"{src}: no such file, directory or preset (presets: {', '.join(PRESETS)})")
        else:
            raise MespError(f"{path}: not a model directory, .gguf file or preset name")
    check_out_file(out, inputs, overwrite)
    size = write_gguf_file(out, arch, add_metadata, plans, target)
    quantized = sum(tensor_type(p.shape, target) == target for p in plans)
    log.info("%s: %d tensors, %d in %s, %d bytes", out, len(plans), quantized, to, size)
    return QuantizeResult(str(out), to, size, len(plans), quantized)


def check_out_file(out: Path, inputs, overwrite: bool) -> None:
    """Refuse an --out that is one of the inputs, a directory, or an existing file without overwrite."""
    if out.exists():
        if any(os.path.samefile(out, i) for i in inputs if Path(i).exists()):
            raise MespError(f"{out}: is an input of this conversion; choose another --out")
        if out.is_dir():
            raise MespError(f"{out}: is a directory; --out names the .gguf file to write")
        if not overwrite:
            raise MespError(f"{out}: already exists (pass --overwrite to replace it)")


def write_gguf_file(out: Path, arch: str, add_metadata, plans: list[TensorPlan], target) -> int:
    """mesp.formats.gguf_writer.write_gguf with an OS error (unwritable --out, full disk) as a MespError."""
    try:
        return write_gguf(out, arch, add_metadata, plans, target)
    except OSError as e:
        raise MespError(f"{out}: cannot write ({one_line(e)})") from e


# ---- sources: (arch, add_metadata(writer), tensor plans, input files) ------------------------------------

def _as_rows(t: torch.Tensor):
    return lambda n0, n1: t[n0:n1]


def _random_source(name: str, target):
    """A random preset, drawn as load_model draws it (seed 0, fp32): the plans keep the drawing order, and each
    matrix's rows are drawn only when the writer asks for them."""
    cfg = ModelConfig.from_hf(dict(PRESETS[name]["config"]), where=f"preset {name}")
    plans = [model_plan(cfg, n, w.shape, _as_rows(w) if isinstance(w, torch.Tensor) else w.read_rows)
             for n, w in random_weights(cfg, seed=0, dtype=torch.float32)] + extra_tensors(cfg)
    return gguf_arch(cfg.arch), lambda writer: add_config_metadata(writer, cfg, target), plans, []


def _hf_source(directory: Path, target):
    """A Hugging Face directory: tensors checked against the configuration (names, shapes, all present), each
    read from its safetensors file block of rows by block of rows."""
    cfg = read_hf_config(directory)
    files = safetensors_files(directory)
    expected = expected_shapes(cfg)
    found = {}
    for f in files:
        for name, w in lazy_safetensors(f, torch.float32, "cpu"):
            if name not in expected:
                if (name == "lm_head.weight" and cfg.tie_word_embeddings) or name.endswith("rotary_emb.inv_freq"):
                    continue  # the tied head is the embedding; inverse frequencies come from the config
                raise MespError(f"{f}: unknown tensor {name!r} for this {cfg.arch} configuration")
            if name in found:
                raise MespError(f"{f}: tensor {name!r} appears twice")
            if tuple(w.shape) != expected[name]:
                raise MespError(f"{f}: tensor {name!r} has shape {tuple(w.shape)}, expected {expected[name]}")
            found[name] = w
    missing = [n for n in expected if n not in found]
    if missing:
        raise MespError(f"{directory}: missing tensor {missing[0]!r}")
    plans = [model_plan(cfg, name, w.shape, lambda n0, n1, w=w: w.read_rows(n0, n1).float())
             for name, w in ((n, found[n]) for n in expected)] + extra_tensors(cfg)
    inputs = [*files, *(p for p in (directory / "config.json", directory / INDEX_FILE) if p.exists())]
    return gguf_arch(cfg.arch), lambda writer: add_config_metadata(writer, cfg, target), plans, inputs


def _gguf_rows(t, where: str):
    """read_rows of a GGUF tensor: rows of its memory map, decoded to fp32."""
    def read_rows(n0, n1):
        try:
            if t.tensor_type == gguf.GGMLQuantizationType.F64:
                return np.asarray(t.data[n0:n1], dtype=np.float32)
            return gguf.quants.dequantize(t.data[n0:n1], t.tensor_type)
        except NotImplementedError as e:
            raise MespError(f"{where}: tensor {t.name!r} has unsupported GGUF tensor type "
                            f"{t.tensor_type.name}") from e
    return read_rows


def _gguf_source(path: Path, target):
    """A GGUF file: its tensors keep their names and row order (already llama.cpp's), re-quantized; its
    metadata is copied. The configuration is read (and checked) as load_model would."""
    where = str(path)
    reader = open_gguf(path)
    cfg = ModelConfig.from_hf(gguf_config(reader, where), where=where)
    plans = []
    for t in reader.tensors:
        if t.name != ROPE_FREQS and gguf_to_hf_name(t.name, cfg.arch) is None:
            raise MespError(f"{where}: unknown tensor {t.name!r}")
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists dims fastest-first
        plans.append(TensorPlan(t.name, shape, _gguf_rows(t, where)))

    return gguf_arch(cfg.arch), lambda writer: copy_metadata(writer, reader, target, where), plans, [path]


def copy_metadata(writer, reader, target, where: str) -> None:
    """A GGUF file's metadata (tokenizer and chat template included) into `writer`, with general.file_type
    that of `target`; what describes the old tensor data is left out (_NOT_COPIED)."""
    for key, field in reader.fields.items():
        if key.startswith(_NOT_COPIED):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            if field.types[1] == gguf.GGUFValueType.ARRAY:
                log.warning("%s: metadata %s (a nested array) is not copied", where, key)
                continue
            value = field.contents()
            if len(value):  # GGUF has no typed empty array to write
                writer.add_key_value(key, value, vtype, sub_type=field.types[1])
        else:
            writer.add_key_value(key, field.contents(), vtype)
    add_file_type(writer, target)
