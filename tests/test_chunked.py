"""MeSP's token chunks and kept layers: the layer's token-wise steps run over chunks of positions (forward,
recompute and backward) and layers may keep their forward's intermediates instead of recomputing them; the
gradients stay autograd's. Chunk sizes are chosen to divide nothing (T = 37 with chunks of 5 and 16).

The reference is mesp's autograd method over the same model (itself checked against transformers + PEFT in
test_engines), with random non-zero LoRA B: fp32 within 1e-5 relative per tensor, fp64 within 1e-10.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from helpers import assert_grads_close, make_batch, randomize_lora_b, relative_error

import mesp
from mesp import blockwise
from mesp.errors import MespError
from mesp.families import ModelConfig
from mesp.memory import PeakMemory
from mesp.model import DecoderLayer
from mesp.methods.mesp import (DEFAULT_ATTN_BLOCK, DEFAULT_TOKEN_CHUNK, MIN_ATTN_BLOCK, SCORE_BLOCK_BYTES, WHOLE_UP_TO,
                              attention_block, layer_forward, token_chunks)
from mesp.methods import METHODS
from mesp.methods import mesp as mesp_engine
from mesp.random_init import init_random_weights
from mesp.train import TrainConfig, resolve, train

# (arch, extra config): every family the tiny presets cover, with q/k norms, sandwich norms and sliding windows
FAMILY_CASES = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}),
    "qwen3": ("qwen3", {}),
    "gemma3": ("gemma3_text", {"sliding_window": 7, "layer_types": ["sliding_attention", "full_attention"],
                               "final_logit_softcapping": 5.0}),
}


def lora_model(make_hf_model, case: str, dtype=torch.float32, targets=None):
    arch, extra = FAMILY_CASES[case]
    path, _ = make_hf_model(arch, **extra)
    model = mesp.load_model(path, dtype=dtype)
    mesp.add_lora(model, mesp.LoraConfig(r=4, alpha=8, target_modules=targets or list(mesp.lora.ALL_TARGETS)))
    return randomize_lora_b(model, std=0.1)


@pytest.mark.parametrize("case", sorted(FAMILY_CASES))
@pytest.mark.parametrize("B,padding", [(1, None), (3, "left"), (2, "right")])
def test_chunked_gradients_equal_autograd_fp32(make_hf_model, case, B, padding):
    model = lora_model(make_hf_model, case)
    ids, labels, mask = make_batch(B, 37, model.config.vocab_size, padding, seed=B, prompt=2 if B > 1 else 0)
    ref_loss, ref = mesp.compute_gradients(model, ids, labels, mask, method="autograd")
    for token_chunk in (5, 16):
        loss, grads = mesp.compute_gradients(model, ids, labels, mask, method="mesp", token_chunk=token_chunk,
                                             attn_block=8, loss_chunk=11)
        assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
        assert_grads_close(grads, ref, 1e-5, f"{case} B={B} token_chunk={token_chunk}")


@pytest.mark.parametrize("case", sorted(FAMILY_CASES))
def test_chunked_gradients_equal_autograd_fp64(make_hf_model, case):
    model = lora_model(make_hf_model, case, dtype=torch.float64)
    ids, labels, mask = make_batch(2, 37, model.config.vocab_size, "left", seed=5, prompt=3)
    _, ref = mesp.compute_gradients(model, ids, labels, mask, method="autograd")
    _, grads = mesp.compute_gradients(model, ids, labels, mask, method="mesp", token_chunk=5, attn_block=16)
    assert all(g.dtype == torch.float64 for g in grads.values())
    assert_grads_close(grads, ref, 1e-10, f"{case} fp64")


@pytest.mark.parametrize("case", sorted(FAMILY_CASES))
def test_kept_layers_equal_recompute(make_hf_model, case):
    """Layers that keep their forward's intermediates give the recompute path's gradients (a layer's steps are
    the same operations either way), chunked or not, with and without store-h; other layers are untouched."""
    model = lora_model(make_hf_model, case, targets=["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"])
    ids, labels, mask = make_batch(3, 37, model.config.vocab_size, "left", seed=7, prompt=2)
    for token_chunk in (0, 16):
        for store_h in (False, True):
            opts = dict(method="mesp", token_chunk=token_chunk, store_h=store_h, attn_block=8)
            loss, ref = mesp.compute_gradients(model, ids, labels, mask, **opts)
            for keep in ({1}, {0, 1}):
                kept_loss, grads = mesp.compute_gradients(model, ids, labels, mask, keep_layers=frozenset(keep),
                                                          **opts)
                assert kept_loss.item() == loss.item()
                assert set(grads) == set(ref)
                for key, r in ref.items():
                    assert relative_error(grads[key], r) <= 1e-6, (case, token_chunk, store_h, keep, key)


def test_kept_layers_are_not_recomputed(make_hf_model, monkeypatch):
    """With every layer kept, each layer's steps run once (the forward) instead of twice, chunk by chunk."""
    model = lora_model(make_hf_model, "qwen3")
    ids, labels, mask = make_batch(2, 37, model.config.vocab_size, "left", seed=8)
    calls = []
    original = DecoderLayer.attention_inputs
    monkeypatch.setattr(DecoderLayer, "attention_inputs", lambda self, x, run: calls.append(x.shape[1]) or
                        original(self, x, run))
    n_layers = model.config.num_hidden_layers
    for keep, runs in ((None, 2), (frozenset(range(n_layers)), 1)):
        calls.clear()
        mesp.compute_gradients(model, ids, labels, mask, method="mesp", token_chunk=16, keep_layers=keep)
        assert calls == [16, 16, 5] * n_layers * runs, (keep, calls)


@pytest.mark.parametrize("case", sorted(FAMILY_CASES))
def test_chunked_forward_equals_unchunked(make_hf_model, case):
    """A layer's chunked forward gives the unchunked output (the same token-wise operations on fewer rows:
    equal up to the matrix products' summation order), and so does the loss."""
    model = lora_model(make_hf_model, case)
    ids, labels, mask = make_batch(2, 37, model.config.vocab_size, "right", seed=3)
    rope = model.rope(torch.arange(37))
    with torch.no_grad():
        x = model.embed(ids)
        for i, layer in enumerate(model.model.layers):
            y = layer_forward(layer, x, rope[i], mask.bool(), attn_block=8, token_chunk=0)
            for token_chunk in (1, 5, 16):
                y_chunked = layer_forward(layer, x, rope[i], mask.bool(), attn_block=8, token_chunk=token_chunk)
                assert relative_error(y_chunked, y) <= 1e-6, (i, token_chunk)
            x = y
    whole, _ = mesp.compute_gradients(model, ids, labels, mask, method="mesp", token_chunk=0)
    for token_chunk in (5, 16, 36):
        loss, _ = mesp.compute_gradients(model, ids, labels, mask, method="mesp", token_chunk=token_chunk)
        assert abs(loss.item() - whole.item()) <= 1e-6 * abs(whole.item())


def test_token_chunks_rule():
    assert token_chunks(37, 5) == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 25), (25, 30), (30, 35), (35, 37)]
    assert token_chunks(37, 0) == token_chunks(37, 37) == token_chunks(37, 100) == [(0, 37)]
    assert token_chunks(WHOLE_UP_TO) == [(0, WHOLE_UP_TO)]  # short sequences run whole by default
    c, T = DEFAULT_TOKEN_CHUNK, WHOLE_UP_TO + 1
    long = token_chunks(T)
    assert long[0] == (0, c) and long[-1] == (T // c * c, T) and len(long) == -(-T // c)
    for bad in (-1, 2.5, True, "8"):
        with pytest.raises(MespError, match="token_chunk"):
            token_chunks(37, bad)


def test_attention_block_rule():
    """Default: 128 query rows, fewer where one fp32 score block [B, heads, rows, T] would pass 8 MiB, never
    under 16; a given block is used as is."""
    assert attention_block(None, 1, 14, 1024, torch.float32) == DEFAULT_ATTN_BLOCK == 128
    rows = attention_block(None, 1, 14, 4096, torch.float32)
    assert rows == SCORE_BLOCK_BYTES // (14 * 4096 * 4) == 36
    assert attention_block(None, 1, 14, 4096, torch.bfloat16) == rows  # scores are fp32 in bf16 too
    assert attention_block(None, 2, 14, 4096, torch.float64) == MIN_ATTN_BLOCK == 16
    assert attention_block(64, 8, 64, 1 << 16, torch.float32) == 64
    for bad in (0, -4, 2.0, True):
        with pytest.raises(MespError, match="attn_block"):
            attention_block(bad, 1, 14, 1024, torch.float32)


def test_bad_keep_layers_is_one_line_error(make_hf_model):
    model = lora_model(make_hf_model, "llama")
    ids, labels, mask = make_batch(1, 9, model.config.vocab_size, None)
    for bad in ({2}, {-1}, 3, {"0"}):
        with pytest.raises(MespError, match="keep_layers"):
            mesp.compute_gradients(model, ids, labels, mask, method="mesp", keep_layers=bad)


def wide_mlp_model(T: int):
    """A one-layer model whose MLP intermediates dominate a layer's working set: F = 2048 beside d = 32, so
    G, U, M and their gradients ([T, F] each) dwarf every [T, d] or attention tensor."""
    cfg = ModelConfig(arch="qwen2", vocab_size=64, hidden_size=32, intermediate_size=2048, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=T)
    model = init_random_weights(mesp.model.Model(cfg), seed=0)
    mesp.add_lora(model, mesp.LoraConfig(r=4, alpha=8, target_modules=list(mesp.lora.ALL_TARGETS)))
    return randomize_lora_b(model)


def test_chunked_step_peak_is_below_the_unchunked_one():
    """The allocator peak above the step's start with 32-token chunks stays below a quarter of the unchunked
    step's at T = 512. Unchunked, the MLP's backward holds at least three [T, F] fp32 tensors at once (G, U and
    gM, then gG, gU: 12 MiB at T = 512, F = 2048); chunked, those are [32, F] (256 KiB each), and every
    whole-sequence tensor left is [T, d] or attention's [T, heads * 16] (64 KiB each) or a score block
    [heads, attn_block, T] (256 KiB at attn_block 32): far under a quarter of the unchunked peak."""
    T = 512
    model = wide_mlp_model(T)
    ids = torch.randint(3, 64, (1, T), generator=torch.Generator().manual_seed(0))
    peaks = {}
    for token_chunk in (0, 32):
        with PeakMemory() as pm:
            mesp.compute_gradients(model, ids, ids, method="mesp", token_chunk=token_chunk, attn_block=32,
                                   loss_chunk=64)
        peaks[token_chunk] = pm.peak_bytes
    assert peaks[0] >= 3 * T * 2048 * 4  # the unchunked MLP backward, as counted above
    assert peaks[32] < peaks[0] / 4, peaks


@pytest.mark.parametrize("settings,match", [
    (dict(token_chunk=-1), r"^token_chunk: must be a non-negative integer"),
    (dict(attn_block=0), r"^attn_block: must be a positive integer"),
    (dict(loss_chunk=0), r"^loss_chunk: must be a positive integer"),
    (dict(method="mebp", token_chunk=8), r"^token_chunk: only used by method mesp, not mebp"),
    (dict(method="mezo", attn_block=64), r"^attn_block: only used by method mesp, not mezo"),
    (dict(method="autograd", loss_chunk=8), r"^loss_chunk: only used by methods mesp and mezo, not autograd"),
])
def test_train_config_checks_the_engine_options(tmp_path, settings, match):
    with pytest.raises(MespError, match=match):
        resolve(TrainConfig(model="m", data="d.jsonl", out=str(tmp_path / "o"), **settings))


def test_train_passes_the_engine_options(make_hf_model, tmp_path, monkeypatch):
    """`mesp train` hands token_chunk, attn_block and loss_chunk to the engine, and a chunked run trains the
    same adapter as a whole-sequence one."""
    path, _ = make_hf_model("qwen2", num_key_value_heads=2)
    data = tmp_path / "train.jsonl"
    g = torch.Generator().manual_seed(0)
    data.write_text("".join(json.dumps({"input_ids": torch.randint(3, 96, (n,), generator=g).tolist()}) + "\n"
                            for n in (30, 21, 32, 17)))
    seen = []
    original = mesp_engine.gradients
    monkeypatch.setattr(mesp_engine, "gradients", lambda *a, **kw: seen.append(
        {k: kw.get(k) for k in ("token_chunk", "attn_block", "loss_chunk")}) or original(*a, **kw))
    monkeypatch.setitem(METHODS, "mesp", mesp_engine.gradients)
    adapters = []
    for token_chunk in (0, 7):
        out = tmp_path / f"run{token_chunk}"
        train(TrainConfig(model=str(path), data=str(data), out=str(out), seq_len=32, batch_size=2, steps=2,
                          token_chunk=token_chunk, attn_block=8, loss_chunk=13))
        adapters.append(load_file(str(out / "adapter_model.safetensors")))
    assert seen == [{"token_chunk": 0, "attn_block": 8, "loss_chunk": 13}] * 2 + [
        {"token_chunk": 7, "attn_block": 8, "loss_chunk": 13}] * 2
    assert set(adapters[0]) == set(adapters[1])
    for key, a in adapters[0].items():
        assert relative_error(adapters[1][key], a) <= 1e-5, key


def test_attention_backward_from_delta_equals_from_o():
    """attention_backward given delta = rowsum(go * o) (so o can be freed first) equals it given o."""
    g = torch.Generator().manual_seed(0)
    q, go = (torch.randn(2, 4, 19, 8, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(2, 2, 19, 8, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.ones(2, 19, dtype=torch.bool)
    mask[1, :5] = False
    o, lse = blockwise.attention_forward(q, k, v, mask, block_size=6, window=7)
    from_o = blockwise.attention_backward(go, q, k, v, o, lse, mask, block_size=6, window=7)
    delta = torch.cat([blockwise.attention_delta(go[:, :, t0:t1], o[:, :, t0:t1]) for t0, t1 in token_chunks(19, 5)],
                      dim=2)
    from_delta = blockwise.attention_backward(go, q, k, v, None, lse, mask, block_size=6, window=7, delta=delta)
    for a, b in zip(from_delta, from_o):
        assert relative_error(a, b) <= 1e-14
