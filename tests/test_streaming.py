"""Weights streamed from disk (mesp.streamed, load_model(weights=...)): exact gradients on streamed GGUF blocks,
streamed = resident bit for bit, nothing resident, pages released after use, and the option errors."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from helpers import assert_grads_close, make_batch, randomize_lora_b, write_gguf

import mesp
from mesp.errors import MespError
from mesp.streamed import MappedWeight

TOL = 1e-5
Q = gguf.GGMLQuantizationType


def with_lora(model, seed=0):
    """LoRA on every projection, B random and non-zero (B = 0 would hide errors)."""
    mesp.add_lora(model, mesp.LoraConfig(r=4, alpha=8), seed=seed)
    return randomize_lora_b(model, seed, std=0.05)


def matrices(model):
    return {name: w for name, w in model.base_weights() if w.dim() == 2}


@pytest.mark.parametrize("arch,qnames", [
    ("llama", ["Q4_0"]), ("llama", ["Q8_0"]), ("llama", ["Q4_1"]), ("llama", ["F16"]),
    ("qwen2", ["Q4_1", "Q8_0", "Q4_0", "F16", "BF16", "F32"]),
])
def test_streamed_gguf_is_exact_and_equals_resident(make_hf_model, tmp_path, arch, qnames):
    _, hf_model = make_hf_model(arch, num_key_value_heads=2)
    path = tmp_path / f"tiny-{arch}.gguf"
    write_gguf(path, hf_model, [Q[n] for n in qnames])
    streamed = with_lora(mesp.load_model(path))  # GGUF streams by default
    assert all(isinstance(w, MappedWeight) and w.nbytes == 0 for w in matrices(streamed).values())
    residents = {"dense": with_lora(mesp.load_model(path, weights="resident")),
                 "native": with_lora(mesp.load_model(path, weights="resident", quantize="gguf"))}
    assert all(isinstance(w, torch.Tensor) for w in matrices(residents["dense"]).values())
    ids, labels, mask = make_batch(3, 17, streamed.config.vocab_size, "left", seed=2)
    ref_loss, ref = mesp.compute_gradients(streamed, ids, labels, mask, method="autograd")
    logits = mesp.forward(streamed, ids, mask)
    for method, options in (("mesp", dict(attn_block=8, loss_chunk=7)), ("mebp", {}), ("autograd", {})):
        loss, grads = mesp.compute_gradients(streamed, ids, labels, mask, method=method, **options)
        assert abs(loss.item() - ref_loss.item()) <= TOL * abs(ref_loss.item())
        assert_grads_close(grads, ref, TOL, f"streamed {qnames} {method}")
        for kind, resident in residents.items():  # the same weights, the same products: the same bits
            r_loss, r_grads = mesp.compute_gradients(resident, ids, labels, mask, method=method, **options)
            assert torch.equal(loss, r_loss), (kind, method)
            assert all(torch.equal(grads[k], r_grads[k]) for k in grads), (kind, method)
    for resident in residents.values():
        assert torch.equal(logits, mesp.forward(resident, ids, mask))
    # rows as the embedding asks for them (scattered, repeated) and the LM head (vocabulary slices)
    emb, dense_emb = streamed.model.embed_tokens.weight, residents["dense"].model.embed_tokens.weight
    rows = torch.tensor([[5, 1, 5], [95, 0, 7]])
    assert torch.equal(emb.rows(rows), dense_emb[rows])
    assert torch.equal(emb.rows(torch.arange(3, 40)), dense_emb[3:40])
    q = streamed.get_submodule("model.layers.0.self_attn.q_proj").weight  # llama: rows un-permuted
    assert torch.equal(q.rows(torch.tensor([7, 0, 3])), residents["dense"].get_submodule(
        "model.layers.0.self_attn.q_proj").weight[[7, 0, 3]])


def test_mezo_streams(make_hf_model, tmp_path):
    _, hf_model = make_hf_model("llama", num_key_value_heads=2)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, hf_model, [Q.Q4_1])
    ids, labels, mask = make_batch(2, 9, hf_model.config.vocab_size, "right", seed=1)
    got = [mesp.compute_gradients(with_lora(mesp.load_model(path, weights=w)), ids, labels, mask, method="mezo")
           for w in ("stream", "resident")]
    assert torch.equal(got[0][0], got[1][0])
    assert all(torch.equal(got[0][1][k], got[1][1][k]) for k in got[0][1])


def test_options(make_hf_model, tmp_path):
    path, hf_model = make_hf_model("qwen2", num_key_value_heads=2)
    with pytest.raises(MespError, match="mesp quantize qwen2.5-0.5b --to q4_0"):
        mesp.load_model("qwen2.5-0.5b", weights="stream")
    with pytest.raises(MespError, match="choose one"):
        mesp.load_model(path, weights="stream", quantize="int4")
    with pytest.raises(MespError, match="choose one"):
        mesp.load_model(path, weights="resident", lazy=True)
    with pytest.raises(MespError, match="weights: unknown 'disk'"):
        mesp.load_model(path, weights="disk")
    g = tmp_path / "tiny.gguf"
    write_gguf(g, hf_model, [Q.Q8_0])
    with pytest.raises(MespError, match="choose one"):
        mesp.load_model(g, weights="stream", quantize="int8")
    # quantize="gguf" streams when asked (the file's blocks either way); int4 of a GGUF is resident by default
    assert isinstance(mesp.load_model(g, weights="stream", quantize="gguf").model.embed_tokens.weight, MappedWeight)
    assert type(mesp.load_model(g, quantize="int4").model.embed_tokens.weight).__name__ == "Int8Weight"
    assert isinstance(mesp.load_model(g, lazy=True).model.embed_tokens.weight, MappedWeight)
    # a Hugging Face directory streams through LazyWeight (its safetensors read by rows)
    lazy = mesp.load_model(path, weights="stream")
    assert all(w.nbytes == 0 and not isinstance(w, torch.Tensor) for w in matrices(lazy).values())


# ---- the shipped SmolLM2 GGUF -------------------------------------------------------------------------

def mapping_rss_kib(address: int) -> int:
    """Resident KiB of the memory map holding `address` (from /proc/self/smaps)."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        span = line.split()[0]
        if "-" in span and all(c in "0123456789abcdef-" for c in span):
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= address < hi:
                rss = next(v for v in lines[i + 1:] if v.startswith("Rss:"))
                return int(rss.split()[1])
    raise AssertionError("no mapping holds the address")


def test_smollm2_streams_by_default(smollm2_model):
    weights = matrices(smollm2_model)
    assert weights and all(isinstance(w, MappedWeight) and w.nbytes == 0 for w in weights.values())
    resident = mesp.load_model("smollm2-135m-instruct", weights="resident")
    ids = torch.tensor([[1, 504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767]])
    with torch.no_grad():
        assert torch.equal(smollm2_model(ids)[0], resident(ids)[0])
    mesp.add_lora(resident, mesp.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "down_proj"]), seed=1)
    randomize_lora_b(resident, 1, std=0.05)
    streamed = mesp.load_model("smollm2-135m-instruct")  # the session's model stays without adapters
    mesp.add_lora(streamed, mesp.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "down_proj"]), seed=1)
    randomize_lora_b(streamed, 1, std=0.05)
    loss, grads = mesp.compute_gradients(streamed, ids, ids, method="mesp")
    r_loss, r_grads = mesp.compute_gradients(resident, ids, ids, method="mesp")
    assert torch.equal(loss, r_loss) and all(torch.equal(grads[k], r_grads[k]) for k in grads)


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="needs Linux /proc/self/smaps")
def test_pages_are_released_after_use(smollm2_model):
    """After a forward pass every weight's pages have left the process (file-backed pages it touched would
    otherwise stay resident: touching them all shows the measure sees them)."""
    w = smollm2_model.model.embed_tokens.weight
    address = w.raw.ctypes.data
    ids = torch.tensor([[1, 504, 2365, 6354, 16438]])
    with torch.no_grad():
        smollm2_model(ids)
    after_use = mapping_rss_kib(address)
    largest = max(v.raw.nbytes for v in matrices(smollm2_model).values()) // 1024
    total = sum(np.asarray(v.raw).sum(dtype=np.uint64) > 0 for v in matrices(smollm2_model).values())
    assert total > 0
    touched = mapping_rss_kib(address)
    assert touched > 2 * largest  # the whole file's matrices: far more than the largest one
    print(f"\nmapped weight pages resident: {after_use} KiB after a forward, {touched} KiB when all touched")
    assert after_use <= 256, (after_use, touched)  # a few straddling pages at most
    for v in matrices(smollm2_model).values():
        v.mapped.release(v.start, v.start + v.raw.nbytes)
    assert mapping_rss_kib(address) <= 256
