"""--dtype auto: bf16 only where the CPU (or CUDA) has native bf16, the environment override, and MeSP's bf16
gradients against autograd's in bf16."""

from __future__ import annotations

import pytest
import torch

from mesp.errors import MespError
from mesp.loaders import load_random
from mesp.lora import LoraConfig, add_lora
from mesp.methods import compute_gradients
from mesp.precision import auto_dtype
from mesp.testing import randomize_lora_b, relative_errors

SMALL = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=256, hidden_size=64,
             intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)


@pytest.mark.parametrize("flags, device, expected", [
    (["avx2", "fma"], "cpu", "float32"),
    (["avx512f", "avx512_bf16"], "cpu", "bfloat16"),
    (["amx_tile", "amx_bf16"], "cpu", "bfloat16"),
    ([], "cpu", "float32"),
    ([], "cuda", "bfloat16"),
])
def test_auto_dtype_picks_bf16_only_where_native(flags, device, expected):
    assert auto_dtype(device, flags=flags) == expected


def test_auto_dtype_environment_override(monkeypatch):
    monkeypatch.setenv("MESP_AUTO_DTYPE", "bfloat16")
    assert auto_dtype("cpu") == "bfloat16" and auto_dtype("cpu", flags=["avx2"]) == "float32"
    monkeypatch.setenv("MESP_AUTO_DTYPE", "int8")
    with pytest.raises(MespError, match="MESP_AUTO_DTYPE"):
        auto_dtype("cpu")


def test_bf16_mesp_gradients_match_autograd_in_bf16():
    """bf16 rounds every intermediate (8 bits of mantissa), in a different order in each engine: the stated
    tolerance is 0.1 relative per tensor (measured ~0.04, the size of bf16 autograd's own distance from fp32)."""
    ids = torch.randint(0, SMALL["vocab_size"], (2, 45), generator=torch.Generator().manual_seed(0))
    results = {}
    for dtype in (torch.bfloat16, torch.float32):
        model = load_random("small", dict(SMALL), dtype, "cpu")
        add_lora(model, LoraConfig(r=4))
        randomize_lora_b(model)
        results[dtype] = {m: compute_gradients(model, ids, ids, method=m) for m in ("autograd", "mesp")}
    loss, grads = results[torch.bfloat16]["mesp"]
    ref_loss, ref = results[torch.bfloat16]["autograd"]
    assert all(g.dtype == torch.float32 for g in grads.values())  # the adapter stays fp32 (lora.adapter_dtype)
    assert abs(float(loss) / float(ref_loss) - 1) < 1e-3
    errors = relative_errors(grads, ref)
    assert max(errors.values()) <= 0.1, errors
    # and bf16 is really in use: its distance from the fp32 reference is far above fp32's own
    fp32_errors = relative_errors(*(results[torch.float32][m][1] for m in ("mesp", "autograd")))
    assert max(fp32_errors.values()) < 1e-5 < min(errors.values())


def test_adapter_and_its_updates_stay_fp32_under_a_bf16_base():
    """An update far below a bf16 weight's spacing (2^-8 relative) must land: a bf16 adapter would round it away."""
    from mesp.optim import make_optimizer

    model = load_random("small", dict(SMALL), torch.bfloat16, "cpu")
    add_lora(model, LoraConfig(r=4))
    params = model.lora_parameters()
    assert model.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in params.values())
    key, a = next((k, p) for k, p in params.items() if k.endswith("lora_A"))
    before = a.detach().clone()
    make_optimizer("sgd").update(key, a, torch.ones_like(a), lr=1e-6)
    assert torch.allclose(a - before, torch.full_like(a, -1e-6), rtol=1e-2, atol=1e-9)
    ids = torch.randint(0, SMALL["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(0))
    for method in ("mesp", "mebp"):  # both engines run a bf16 base with an fp32 adapter
        loss, grads = compute_gradients(model, ids, ids, method=method)
        assert torch.isfinite(loss) and all(g.dtype == torch.float32 for g in grads.values())
