"""Writing GGUF files as llama.cpp's convert_hf_to_gguf.py does, one block of rows at a time.

    hf_to_gguf_name(name, arch)           'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight'
    gguf_arch(arch)                       llama.cpp's general.architecture of a mesp family
    permute(w, n_head)                    llama's q/k row order for llama.cpp's rope (inverse of gguf.unpermute)
    model_plan(cfg, name, shape, rows)    one model tensor to write: llama.cpp's name, permutation, norm shift
    add_config_metadata(writer, cfg, ...) the model's sizes under llama.cpp's "<arch>.*" keys
    tensor_type(shape, target)            which GGML type a tensor is stored in
    write_gguf(path, arch, ...)           header, metadata, tensor infos, then every tensor's data, atomically

The names and the permutation are the inverses of mesp.formats.gguf's tables (one table, read both ways), so a
file this module writes loads back through mesp.formats.gguf. Tensor data is produced block of rows by block
of rows and written straight to the file: the gguf package's write_tensor_data takes a whole tensor at once,
which for an embedding table would hold the full matrix in memory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import gguf
import numpy as np

from ..errors import MespError
from ..families import ModelConfig
from ..fileio import atomic_write
from .gguf import (GEMMA3_LOCAL_ROPE_BASE, GEMMA3_SLIDING_PATTERN, GGUF_ARCHES, GGUF_LAYER_NAMES, GGUF_TOP_NAMES,
                   LAYER_NAMES_OF, NORM_SHIFT, ROPE_FREQS, llama3_rope_factors, permuted_heads)

Q = gguf.GGMLQuantizationType
TARGETS = {"q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q8_0": Q.Q8_0}  # `mesp quantize --to` -> GGML block type
OUT_TYPES = {"f32": Q.F32, "f16": Q.F16, **TARGETS}  # every type a written matrix can take
FILE_TYPES = {Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
              Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, Q.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
              Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}  # general.file_type of a file mostly in that type
BLOCK = 32  # values per Q4_0 / Q4_1 / Q8_0 block: a matrix is quantized when its rows split into whole blocks
CHUNK_VALUES = 1 << 22  # source values per block of rows converted at once (16 MiB of fp32)

_HF_TOP_NAMES = {hf: g for g, hf in GGUF_TOP_NAMES.items()}
_MESP_TO_GGUF_ARCH = {family: g for g, family in GGUF_ARCHES.items()}


def gguf_arch(arch: str) -> str:
    """llama.cpp's general.architecture for mesp family `arch` ("gemma3_text" -> "gemma3")."""
    return _MESP_TO_GGUF_ARCH.get(arch, arch)


def hf_to_gguf_name(name: str, arch: str = "llama") -> str:
    """A transformers tensor name of mesp family `arch` as llama.cpp names it; MespError for a name the tables
    do not know."""
    module, attr = name.rsplit(".", 1) if "." in name else (name, "")
    if module in _HF_TOP_NAMES:
        return f"{_HF_TOP_NAMES[module]}.{attr}"
    layer_names = {hf: g for g, hf in LAYER_NAMES_OF.get(arch, GGUF_LAYER_NAMES).items()}
    parts = module.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in layer_names:
        return f"blk.{parts[2]}.{layer_names[parts[3]]}.{attr}"
    raise MespError(f"tensor {name!r} has no llama.cpp name")


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: within each head, rows [first half; second half] interleaved
    pairwise, the order llama.cpp's rope expects. Works on any block of whole heads."""
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def tensor_type(shape: tuple[int, ...], target: Q, fallback: Q = Q.F32) -> Q:
    """`target` for every matrix (projections, embedding, LM head) whose rows split into whole blocks of it;
    `fallback` for a matrix whose input dimension does not; F32 for vectors (norms, biases), as llama.cpp
    keeps them."""
    if len(shape) != 2:
        return Q.F32
    return target if shape[1] % gguf.GGML_QUANT_SIZES[target][0] == 0 else fallback


def add_config_metadata(writer: gguf.GGUFWriter, cfg: ModelConfig, target: Q) -> None:
    """The model's sizes and hyperparameters under the keys convert_hf_to_gguf writes (what gguf_config reads).
    Gemma 3: the keys llama.cpp reads (sliding window, final soft-capping); what it hard-codes instead must
    be what the configuration says (check_gemma3_fixed), or the file would describe another model."""
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads or cfg.arch == "gemma3_text":
        # Gemma 3: llama.cpp's and mesp's readers take the score scale from key_length
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    if rope_scaling_kind(cfg) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    if isinstance(cfg.bos_token_id, int):
        writer.add_bos_token_id(cfg.bos_token_id)
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) and cfg.eos_token_id else cfg.eos_token_id
    if isinstance(eos, int):
        writer.add_eos_token_id(eos)
    if cfg.arch == "gemma3_text":
        check_gemma3_fixed(cfg)
        if cfg.sliding_window is not None:
            writer.add_sliding_window(cfg.sliding_window)
        if cfg.final_logit_softcapping is not None:
            writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    add_file_type(writer, target)


def check_gemma3_fixed(cfg: ModelConfig) -> None:
    """MespError unless the Gemma 3 settings llama.cpp does not read from a file (the local RoPE base, every
    GEMMA3_SLIDING_PATTERN-th layer global, scores scaled by head_dim^-1/2) are this configuration's: mesp's
    reader fills them in as llama.cpp does."""
    types = ["full_attention" if (i + 1) % GEMMA3_SLIDING_PATTERN == 0 else "sliding_attention"
             for i in range(cfg.num_hidden_layers)]
    want = {"rope_local_base_freq": GEMMA3_LOCAL_ROPE_BASE, "query_pre_attn_scalar": cfg.head_dim,
            "layer_types": types if "sliding_attention" in types else None}  # None: every layer alike
    for key, value in want.items():
        got = getattr(cfg, key)
        if got != value:
            raise MespError(f"Gemma 3 with {key} = {got!r} cannot be written to GGUF (llama.cpp assumes {value!r})")


def rope_scaling_kind(cfg: ModelConfig) -> str | None:
    """None, "linear" (metadata keys) or "llama3" (a rope_freqs tensor); MespError for kinds llama.cpp keeps
    in keys mesp does not read back."""
    scaling = cfg.rope_scaling
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ("linear", "llama3"):
        raise MespError(f"writing rope scaling {kind!r} to GGUF is not supported (linear and llama3 are)")
    return kind


def extra_tensors(cfg: ModelConfig) -> list[TensorPlan]:
    """Tensors llama.cpp adds beside the model's own: llama3 rope scaling's rope_freqs (as convert_hf_to_gguf
    writes it, F32)."""
    if rope_scaling_kind(cfg) != "llama3":
        return []
    s = cfg.rope_scaling
    factors = np.array(llama3_rope_factors(cfg.head_dim, cfg.rope_theta, float(s["factor"]),
                                           float(s["low_freq_factor"]), float(s["high_freq_factor"]),
                                           int(s["original_max_position_embeddings"])), dtype=np.float32)
    return [TensorPlan(ROPE_FREQS, factors.shape, lambda n0, n1: factors[n0:n1])]


def add_file_type(writer: gguf.GGUFWriter, target: Q) -> None:
    """general.file_type and the quantization version, as llama.cpp's quantizer writes them."""
    writer.add_file_type(int(FILE_TYPES[target]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


@dataclass
class TensorPlan:
    """One tensor to write: its llama.cpp name, its shape in transformers' [out, in] order, and where its rows
    come from. read_rows(n0, n1) returns rows [n0, n1) as fp32 (a numpy array or a CPU tensor); rows are asked
    for in order, in blocks of a multiple of 16 rows (all but the last), so seeded random rows come out as one
    draw of the whole matrix would give them. permute_heads: apply llama's q/k permutation with this many
    heads."""
    name: str
    shape: tuple[int, ...]
    read_rows: Callable[[int, int], object]
    permute_heads: int | None = None
    shift: float = 0.0  # added to every value (Gemma's norms are stored as 1 + w)
    qtype: Q | None = None  # the stored type; None: tensor_type(shape, the file's target)


def model_plan(cfg: ModelConfig, name: str, shape, read_rows) -> TensorPlan:
    """The plan of model tensor `name` (transformers' name and [out, in] order) as convert_hf_to_gguf writes
    it: llama.cpp's name, llama's q/k permutation, Gemma's norm shift (the inverse of mesp.formats.gguf's)."""
    shift = NORM_SHIFT.get(cfg.arch, 0.0) if name.endswith("norm.weight") else 0.0
    return TensorPlan(hf_to_gguf_name(name, cfg.arch), tuple(shape), read_rows, permuted_heads(cfg, name), shift)


def _row_blocks(plan: TensorPlan):
    """[n0, n1) blocks covering the tensor's rows: about CHUNK_VALUES values each, a multiple of 16 rows, and of
    a head's rows when the block is permuted (the permutation stays within a head)."""
    rows = plan.shape[0]
    cols = math.prod(plan.shape[1:])
    unit = 16
    if plan.permute_heads:
        unit = math.lcm(unit, rows // plan.permute_heads)
    step = max(unit, CHUNK_VALUES // max(cols, 1) // unit * unit)
    for n0 in range(0, rows, step):
        yield n0, min(rows, n0 + step)


def _tensor_bytes(plan: TensorPlan, qtype: Q):
    """The tensor's stored bytes, block of rows by block of rows."""
    for n0, n1 in _row_blocks(plan):
        rows = plan.read_rows(n0, n1)
        rows = np.ascontiguousarray(rows.numpy() if hasattr(rows, "numpy") else rows, dtype=np.float32)
        if plan.permute_heads:
            rows = permute(rows, plan.permute_heads * (n1 - n0) // plan.shape[0])
        if plan.shift:
            rows = rows + np.float32(plan.shift)
        yield gguf.quants.quantize(rows, qtype)


def write_gguf(path, arch: str, add_metadata: Callable[[gguf.GGUFWriter], None], tensors: list[TensorPlan],
               target: Q) -> int:
    """Write a GGUF file at `path` atomically (a temporary file in its directory, fsynced, renamed; removed on
    any error or Ctrl-C): the header, the metadata add_metadata(writer) adds, every tensor's info, then every
    tensor's data in `tensors` order, each stored as tensor_type(shape, target). Returns the file's size."""
    infos = []
    for plan in tensors:
        qtype = plan.qtype or tensor_type(plan.shape, target)
        byte_shape = gguf.quants.quant_shape_to_byte_shape(plan.shape, qtype) if qtype != Q.F32 else plan.shape
        nbytes = math.prod(byte_shape) * (1 if qtype != Q.F32 else 4)
        infos.append((plan, qtype, byte_shape, nbytes))

    def write(tmp):
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            add_metadata(writer)
            for plan, qtype, byte_shape, nbytes in infos:
                writer.add_tensor_info(plan.name, byte_shape, np.dtype(np.float32 if qtype == Q.F32 else np.uint8),
                                       nbytes, raw_dtype=None if qtype == Q.F32 else qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            out = writer.fout[0]
            writer.write_padding(out, out.tell())  # tensor data starts aligned; offsets count from there
            for plan, qtype, _, nbytes in infos:
                written = 0
                for block in _tensor_bytes(plan, qtype):
                    block.tofile(out)
                    written += block.nbytes
                if written != nbytes:  # a row source that gave the wrong shape would shift every later tensor
                    raise MespError(f"tensor {plan.name!r}: wrote {written} bytes, expected {nbytes}")
                writer.write_padding(out, nbytes)
            out.flush()
        finally:
            writer.close()

    atomic_write(path, write)  # fsynced before the rename, temporary removed on error or Ctrl-C
    return os.path.getsize(path)
