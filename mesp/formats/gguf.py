"""GGUF, llama.cpp's format: everything mesp knows about it (the header itself: mesp.formats.gguf_header).

    open_gguf(path)                      the file's header (a MespError, naming the file, if it is not GGUF or
                                         any count, length or extent in its header does not fit the file)
    check_gguf_header(path)              the same checks, nothing kept
    gguf_config(reader, where)           its metadata as the transformers config.json dict
    gguf_tensors(reader, cfg, where, ...) (Hugging Face name, tensor or quantized weight) of every tensor

What differs from a Hugging Face checkpoint, and where it is undone here:
- names: GGUF_LAYER_NAMES / GGUF_TOP_NAMES map llama.cpp's tensor names to transformers' (gguf_to_hf_name),
  plus q/k norms and Gemma's sandwich norms in LAYER_NAMES_OF (Gemma's ffn_norm is the pre-feedforward norm);
- architectures: llama.cpp's "gemma3" is mesp's (and transformers') "gemma3_text" (GGUF_ARCHES);
- q/k rows: convert_hf_to_gguf permutes the q and k projections of llama (and SmolLM3, a LlamaModel there) for
  llama.cpp's rope (unpermute); Qwen and Gemma are written unpermuted;
- norms: convert_hf_to_gguf writes Gemma's (1 + w) norm weights as 1 + w (every tensor named *norm.weight);
  mesp's family computes with w, so 1 is subtracted on loading (NORM_SHIFT);
- metadata: sizes under "<arch>.*" keys, float32 values, llama3 rope scaling stored as a rope_freqs tensor of
  per-frequency divisors (llama3_rope_scaling recovers the parameters); what llama.cpp hard-codes for Gemma 3
  (local RoPE base 10000, every 6th layer global, query_pre_attn_scalar) is filled in as llama.cpp does;
- blocks (mesp.formats.gguf_blocks): Q8_0 / Q4_0 / Q4_1 decode into mesp.quant's Int8Weight / Int4Weight
  form, Q5_0 / Q5_1 and the K-quants Q4_K / Q5_K / Q6_K stay in their own blocks (mesp.quant.BlockWeight);
  either kind is kept resident (gguf_weight), left in the memory-mapped file and decoded rows at a time
  (mapped_weight, mesp.streamed), or decoded dense; other types are dequantized by the gguf package.

mesp.formats.gguf_writer writes files by inverting these same tables and the permutation, so each fact about
the format stays written once.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import gguf  # the PyPI package (this module is mesp.formats.gguf)
import numpy as np
import torch

from ..errors import MespError, one_line
from ..families import FAMILIES, ModelConfig, expected_shapes
from ..streamed import MappedFile
from .gguf_blocks import gguf_weight, mapped_weight
from .gguf_header import GGUFHeader

log = logging.getLogger(__name__)


# ---- names ----------------------------------------------------------------------------------------------

GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
QK_NORM_NAMES = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
LAYER_NAMES_OF = {  # families whose layers hold more tensors than llama's (every other: GGUF_LAYER_NAMES)
    "qwen3": {**GGUF_LAYER_NAMES, **QK_NORM_NAMES},
    "gemma3_text": {**GGUF_LAYER_NAMES, **QK_NORM_NAMES, "post_attention_norm": "post_attention_layernorm",
                    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"},
}
GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
ROPE_FREQS = "rope_freqs.weight"  # llama3 rope scaling as a tensor; folded into the config
GGUF_ARCHES = {"gemma3": "gemma3_text"}  # llama.cpp's general.architecture -> mesp family, where they differ
PERMUTED_ARCHS = ("llama", "smollm3")  # families whose q/k rows convert_hf_to_gguf permutes
NORM_SHIFT = {"gemma3_text": 1.0}  # what convert_hf_to_gguf adds to every norm weight of a family
GEMMA3_LOCAL_ROPE_BASE = 10000.0  # llama.cpp's rope base of Gemma 3's sliding-window layers
GEMMA3_SLIDING_PATTERN = 6  # llama.cpp: every 6th Gemma 3 layer attends fully
GEMMA3_27B_LAYERS = 62  # llama.cpp scales Gemma 3 27B's scores by hidden / heads, every other size by head_dim


def family_of(gguf_arch) -> str | None:
    """mesp's family key of a GGUF general.architecture, or None when mesp has no such family."""
    arch = GGUF_ARCHES.get(gguf_arch, gguf_arch)
    return arch if arch in FAMILIES else None


def gguf_to_hf_name(name: str, arch: str = "llama") -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight' (names of mesp family `arch`); None if
    not a model tensor."""
    parts = name.split(".")
    layer_names = LAYER_NAMES_OF.get(arch, GGUF_LAYER_NAMES)
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in layer_names:
        return f"model.layers.{parts[1]}.{layer_names[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in GGUF_TOP_NAMES:
        return f"{GGUF_TOP_NAMES[parts[0]]}.{parts[1]}"
    return None


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's LlamaModel.permute (rows of q/k interleaved per head for llama.cpp's rope)."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


def permuted_heads(cfg: ModelConfig, hf_name: str) -> int | None:
    """The head count whose permutation a tensor's rows carry (llama q and k projections), else None."""
    if cfg.arch not in PERMUTED_ARCHS:
        return None
    if ".self_attn.q_proj." in hf_name:
        return cfg.num_attention_heads
    if ".self_attn.k_proj." in hf_name:
        return cfg.num_key_value_heads
    return None


# ---- metadata -------------------------------------------------------------------------------------------

def open_gguf(path: Path) -> GGUFHeader:
    """The header of GGUF file `path` (metadata, tensor table, tensors mapped on demand); a MespError naming the
    file when it is not GGUF or its header does not fit the file."""
    return GGUFHeader(path)


def check_gguf_header(path: Path) -> None:
    """Check a GGUF file's header against its size (GGUFHeader's checks) without keeping anything."""
    GGUFHeader(path)


def llama3_rope_factors(head_dim: int, theta: float, factor: float, low: float, high: float,
                        orig: int) -> list[float]:
    """convert_hf_to_gguf's rope_freqs tensor for llama3 rope scaling: per frequency, the divisor llama3
    applies (1 for short wavelengths, `factor` for long ones, a smooth blend between)."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    low_wl, high_wl = orig / low, orig / high
    out = []
    for f in inv:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(factor)
        else:
            s = (orig / wl - low) / (high - low)
            out.append(1.0 / ((1 - s) / factor + s))
    return out


def llama3_rope_scaling(freqs: np.ndarray, head_dim: int, theta: float) -> dict:
    """Recover llama3 rope_scaling from llama.cpp's rope_freqs tensor (its per-frequency divisors)."""
    top = float(np.float32(freqs.max())) if len(freqs) else 1.0
    for orig in [8192] + [2 ** k for k in range(4, 18) if k != 13]:
        for factor in dict.fromkeys([round(top), 8.0, 32.0, 16.0, 4.0, 2.0, 64.0]):
            for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0)):
                out = llama3_rope_factors(head_dim, theta, factor, low, high, orig)
                if len(out) == len(freqs) and np.allclose(out, freqs, rtol=1e-3, atol=1e-4):
                    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                            "high_freq_factor": high, "original_max_position_embeddings": orig}
    raise MespError("unsupported rope_freqs tensor (not a recognised llama3 rope scaling)")


def gguf_config(reader, where: str) -> dict:
    """The transformers config.json dict that a GGUF file's metadata describes."""
    arch = reader.metadata("general.architecture")
    family = family_of(arch)
    if family is None:
        known = sorted({a for a in FAMILIES if a not in GGUF_ARCHES.values()} | set(GGUF_ARCHES))
        raise MespError(f"{where}: unsupported architecture {arch!r} (supported: {', '.join(known)})")
    names = {t.name for t in reader.tensors}

    def need(key):
        v = reader.metadata(f"{arch}.{key}")
        if v is None:
            raise MespError(f"{where}: missing metadata {arch}.{key}")
        return v

    # Sizes pass through unconverted: ModelConfig.from_hf checks each (type and range) before anything is built.
    hidden = need("embedding_length")
    heads = need("attention.head_count")
    kv = reader.metadata(f"{arch}.attention.head_count_kv", heads)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = tokens.count if tokens is not None else reader.metadata(f"{arch}.vocab_size")
    if vocab is None:
        emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        if emb is None:
            raise MespError(f"{where}: missing tensor 'token_embd.weight'")
        vocab = int(emb.shape[-1])
    eps = reader.metadata(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    hf = {
        "architectures": [FAMILIES[family].hf_class],
        "model_type": family,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": reader.metadata(f"{arch}.attention.key_length"),
        "rms_norm_eps": float(str(np.float32(eps))),  # metadata holds float32: 1e-5 reads 9.99999974e-06
        "rope_theta": float(str(np.float32(reader.metadata(f"{arch}.rope.freq_base", 10000.0)))),
        "max_position_embeddings": reader.metadata(f"{arch}.context_length", 2048),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": reader.metadata("tokenizer.ggml.bos_token_id"),
        "eos_token_id": reader.metadata("tokenizer.ggml.eos_token_id"),
    }
    if arch == "llama":
        hf["attention_bias"] = "blk.0.attn_q.bias" in names
    if family == "gemma3_text":
        hf.update(gemma3_config(reader, hf))
    if isinstance(hf["max_position_embeddings"], int) and hf["max_position_embeddings"] <= 0:
        hf["max_position_embeddings"] = 2048
    scaling_type = reader.metadata(f"{arch}.rope.scaling.type")
    if scaling_type not in (None, "none"):
        if scaling_type != "linear":
            raise MespError(f"{where}: unsupported rope scaling {scaling_type!r}")
        hf["rope_scaling"] = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
    head_dim = hf["head_dim"] or (hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 else 0)
    if ROPE_FREQS in names and isinstance(head_dim, int) and head_dim > 0:  # bad sizes: from_hf names the field
        t = next(t for t in reader.tensors if t.name == ROPE_FREQS)
        freqs = np.asarray(t.data, dtype=np.float64).reshape(-1)
        try:
            hf["rope_scaling"] = llama3_rope_scaling(freqs, head_dim, hf["rope_theta"])
        except MespError as e:
            raise MespError(f"{where}: {e}") from e
    return hf


def gemma3_config(reader, hf: dict) -> dict:
    """Gemma 3's config.json fields beyond the common ones: from the metadata where llama.cpp writes them,
    else what llama.cpp hard-codes (it reads no local RoPE base, sliding pattern or score scale from the file)."""
    head_dim, heads = hf["head_dim"], hf["num_attention_heads"]
    scalar = head_dim
    if hf["num_hidden_layers"] == GEMMA3_27B_LAYERS and isinstance(heads, int) and heads > 0:
        scalar = hf["hidden_size"] // heads
    out = {"hidden_activation": "gelu_pytorch_tanh", "rope_local_base_freq": GEMMA3_LOCAL_ROPE_BASE,
           "sliding_window_pattern": GEMMA3_SLIDING_PATTERN, "query_pre_attn_scalar": scalar,
           "sliding_window": reader.metadata("gemma3.attention.sliding_window")}
    cap = reader.metadata("gemma3.final_logit_softcapping")
    if cap is not None:
        out["final_logit_softcapping"] = float(str(np.float32(cap)))
    return out


# ---- tensors --------------------------------------------------------------------------------------------

def dequantize(t, where: str) -> torch.Tensor:
    """A GGUF tensor as a dense fp32 tensor in transformers' [out, in] order (the gguf package's decoders)."""
    qtype = t.tensor_type
    if qtype == gguf.GGMLQuantizationType.F64:
        arr = np.asarray(t.data, dtype=np.float32)
    else:
        try:
            arr = gguf.quants.dequantize(t.data, qtype)
        except NotImplementedError as e:  # the package's answer for a type it has no decoder for
            raise MespError(f"{where}: tensor {t.name!r} has unsupported GGUF tensor type {qtype.name}") from e
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists dims fastest-first
    arr = np.asarray(arr, dtype=np.float32)
    if not (arr.flags.writeable and arr.flags.c_contiguous):  # F32 comes back as a view of the mapped file
        arr = np.array(arr, dtype=np.float32, order="C")
    return torch.from_numpy(arr.reshape(shape))


def gguf_tensors(reader, cfg: ModelConfig, where: str, keep_quantized: bool, dtype: torch.dtype,
                 stream: bool = False):
    """Yield (Hugging Face name, tensor or weight object) for every model tensor of the file, q/k rows
    un-permuted, norm weights unshifted (NORM_SHIFT).

    stream: 2-D F32 / F16 / BF16 and block-type (Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q4_K / Q5_K / Q6_K)
    matrices stay in the memory-mapped file (mesp.streamed.MappedWeight, decoded rows at a time at each use);
    keep_quantized (when not streaming): block-type matrices stay in their own quantization (Int4Weight /
    Int8Weight for Q4_0 / Q4_1 / Q8_0 when their shape allows, BlockWeight for the others). Everything else comes as fp32 tensors, matrices decoded a block of rows at a time through the
    same formulas as the streamed and quantized forms (so every form of a file computes the same weights)."""
    mapped = None
    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            continue  # folded into config.rope_scaling
        name = gguf_to_hf_name(t.name, cfg.arch)
        if name is None:
            raise MespError(f"{where}: unknown tensor {t.name!r}")
        heads = permuted_heads(cfg, name)
        rows = int(t.shape[-1])
        if heads and rows % (2 * heads):
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))
            raise MespError(f"{where}: tensor {t.name!r} has shape {shape}, expected {expected_shapes(cfg).get(name)}")
        perm = unpermute(torch.arange(rows), heads) if heads else None
        if keep_quantized and not stream:
            w = gguf_weight(t, perm, dtype)  # None: not a block type it keeps, so it loads dense below
            if w is not None:
                yield name, w
                continue
        if len(t.shape) == 2:
            if mapped is None:
                mapped = MappedFile(reader.path)
            w = mapped_weight(mapped, t, perm, dtype)
            if w is not None:
                yield name, (w if stream else w.dequantize(torch.float32))
                continue
            if stream:
                log.warning("%s: tensor %s (%s) cannot be streamed; it loads dense", where, t.name, t.tensor_type.name)
        try:
            w = dequantize(t, where)
        except MespError:
            raise
        except Exception as e:
            raise MespError(f"{where}: tensor {t.name!r} is unreadable ({one_line(e)})") from e
        if heads:
            w = unpermute(w, heads)
        shift = NORM_SHIFT.get(cfg.arch)
        if shift and name.endswith("norm.weight"):
            w = w - shift
        yield name, w
