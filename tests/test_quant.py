"""Quantized (int8, int4, GGUF Q4_0/Q4_1/Q8_0) and lazily read base weights (mesp.quant, the GGUF block
decoders of mesp.formats.gguf, LazyWeight of mesp.formats.safetensors, the load policy of mesp.loaders).

Every product a weight object computes is checked against the same product with its dequantized matrix, and
gradients on quantized models are checked to be exactly those of the quantized model: MeSP and MeBP against
autograd on the same weights, and autograd on the weights against autograd on a plain model holding their
dequantized values (fp32 relative error <= 1e-5 per tensor).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from helpers import assert_grads_close, make_batch, randomize_lora_b, relative_error, write_gguf

import mesp
from mesp import quant
from mesp.cpu import CAPABILITIES, kernel_capabilities
from mesp.errors import MespError
from mesp.formats.gguf_blocks import q4_weight, q8_0_weight
from mesp.formats.safetensors import LazyWeight
from mesp.loaders import load_random
from mesp.model import set_weight

TOL = 1e-5
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: a second OpenMP thread only adds spin-waiting on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randw(*shape, seed=0, outliers=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g)
    if outliers:  # a few large values, a constant row and a zero row: the cases scale/zero handling breaks on
        w[0, 3] = 25.0
        w[1] = 0.5
        w[2] = 0.0
    return w


# ---- formats --------------------------------------------------------------------------------------------

def test_int4_kernel_layout_round_trip():
    B, _, _ = quant.int4_layout()
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (3 * B + 16, 96), dtype=torch.int32, generator=g)  # full blocks + a tail
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    N = codes.shape[0]
    for n0, n1 in ((0, N), (5, B + 7), (B, 2 * B), (3 * B + 2, N), (N - 1, N)):
        assert torch.equal(quant.unpack_int4(packed, codes.shape, n0, n1).int(), codes[n0:n1]), (n0, n1)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantization_error_within_half_a_step(mode):
    N, K = 48, 128
    w = randw(N, K)
    if mode == "int8":
        q = quant.Int8Weight.quantize(w, w.shape)
        step = q.scale.expand(N, K)  # one scale per row
    else:
        q = quant.Int4Weight.quantize(w, w.shape)
        assert q.group == quant.INT4_GROUP_SIZE
        step = q.scale_zero[..., 0].t().repeat_interleave(q.group, dim=1)
    err = (q.dequantize() - w).abs()
    assert (err <= 0.5 * step + 1e-6).all(), (err - 0.5 * step).max()
    assert torch.equal(q.dequantize()[2], torch.zeros(K)) and torch.allclose(q.dequantize()[1], w[1])
    assert q.nbytes < w.numel() * (1.1 if mode == "int8" else 0.7)  # bytes per weight, fp32 is 4


def test_int4_group_size_follows_the_input_width():
    assert quant.int4_supported((64, 96)) == 32  # 96 is not a multiple of 64
    assert quant.int4_supported((64, 256), 128) == 128
    assert quant.int4_supported((24, 64)) is None and quant.int4_supported((64, 48)) is None
    with pytest.raises(MespError, match="int4 needs"):
        quant.Int4Weight.quantize(randw(24, 64), (24, 64))


def gguf_blocks(w: torch.Tensor, qtype) -> tuple[np.ndarray, torch.Tensor]:
    raw = gguf.quants.quantize(w.numpy(), qtype)
    return raw, torch.from_numpy(np.array(gguf.quants.dequantize(raw, qtype), dtype=np.float32))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_gguf_blocks_match_gguf_dequantize(qtype):
    w = randw(64, 96, seed=3)
    raw, ref = gguf_blocks(w, qtype)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    for p in (None, perm):
        if qtype == Q.Q8_0:
            q = q8_0_weight(raw, p)
        else:
            q = q4_weight(raw, qtype == Q.Q4_1, p)
        want = ref if p is None else ref[p]
        # Q4_1 is evaluated as (q - 8) d + (m + 8 d), the kernel's form: equal to d q + m up to rounding
        assert relative_error(q.dequantize(), want) <= 1e-7


def weights_under_test():
    """One matrix in every weight type, with enough rows for three row blocks of the widest alignment: PyTorch's
    packed int4 layout aligns row blocks to 32 rows on AVX2 CPUs and 64 on AVX-512 ones, so the row count is
    read from the layout, never assumed."""
    align = max(quant.Int4Weight.quantize(randw(64, 128), (64, 128)).row_align, 32)
    w = randw(3 * align, 128, seed=5)
    raw, _ = gguf_blocks(w, Q.Q8_0)
    return {"int8": quant.Int8Weight.quantize(w, w.shape), "int4": quant.Int4Weight.quantize(w, w.shape),
            "q8_0": q8_0_weight(raw), "q4_1": q4_weight(gguf_blocks(w, Q.Q4_1)[0], True)}


@pytest.mark.parametrize("kind", ["int8", "int4", "q8_0", "q4_1"])
@pytest.mark.parametrize("blocks", [1, 3])
def test_products_match_the_dequantized_matrix(kind, blocks, monkeypatch):
    w = weights_under_test()[kind]
    N, K = w.shape
    if blocks > 1:  # force several row blocks (the path large matrices such as the LM head take)
        monkeypatch.setattr(quant.FrozenWeight, "chunk_elements", N * K // blocks)
        assert len(w.row_blocks()) >= blocks
    W = w.dequantize(torch.float64)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 5, K, generator=g)
    gy = torch.randn(2, 5, N, generator=g)
    assert relative_error(w.linear(x), x.double() @ W.t()) <= 1e-6
    assert relative_error(w.linear_grad_input(gy), gy.double() @ W) <= 1e-6
    assert w.linear(x).dtype == torch.float32 and w.linear_grad_input(gy).dtype == torch.float32
    # bf16 activations take PyTorch's kernels where the layout allows (per-channel int8, int4)
    xb = x.bfloat16()
    assert w.linear(xb).dtype == torch.bfloat16
    assert relative_error(w.linear(xb), xb.double() @ W.t()) <= 1e-2
    assert relative_error(w.linear_grad_input(gy.bfloat16()), gy.bfloat16().double() @ W) <= 1e-2
    # rows: scattered (repeats, across blocks) and contiguous ranges, as the embedding and LM head ask
    dense = w.dequantize()
    ids = torch.tensor([[N - 1, 0, 33, 33], [2, 64, 65, N - 2]])
    assert torch.equal(w.rows(ids), dense[ids])
    assert torch.equal(w.rows(torch.arange(17, 80)), dense[17:80])


# ---- models ---------------------------------------------------------------------------------------------

def with_lora(model, seed=0):
    """LoRA on every projection, B random and non-zero (B = 0 would hide errors)."""
    mesp.add_lora(model, mesp.LoraConfig(r=4, alpha=8), seed=seed)
    return randomize_lora_b(model, seed, std=0.05)


def dense_twin(model):
    """A plain-tensor copy of `model` whose base weights are the dequantized values of its weights."""
    import copy

    twin = copy.deepcopy(model)
    for name, w in model.base_weights():
        if isinstance(w, quant.FrozenWeight):
            set_weight(twin, name, w.dequantize(torch.float32))
    return twin


def tiny_gguf(make_hf_model, tmp_path, arch="llama"):
    _, hf_model = make_hf_model(arch, num_key_value_heads=2)
    path = tmp_path / f"tiny-{arch}.gguf"
    stored = write_gguf(path, hf_model, [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.F16])
    return path, stored


def load(make_hf_model, tmp_path, arch, quantize, tied=False):
    if quantize == "gguf":
        return mesp.load_model(tiny_gguf(make_hf_model, tmp_path, arch)[0], quantize="gguf")
    path, _ = make_hf_model(arch, num_key_value_heads=2, tie_word_embeddings=tied)
    return mesp.load_model(path, quantize=quantize)


@pytest.mark.parametrize("arch,quantize,tied", [("qwen2", "int8", False), ("llama", "int4", True),
                                                ("qwen2", "int4", False), ("llama", "gguf", False)])
def test_gradients_are_exact_for_the_quantized_model(make_hf_model, tmp_path, arch, quantize, tied):
    model = with_lora(load(make_hf_model, tmp_path, arch, quantize, tied))
    kinds = {type(w).__name__ for _, w in model.base_weights()}
    assert {"Int8Weight", "Int4Weight"} & kinds, kinds
    ids, labels, mask = make_batch(3, 19, model.config.vocab_size, "left", seed=2)
    ref_loss, ref = mesp.compute_gradients(model, ids, labels, mask, method="autograd")
    for method, options in (("mesp", dict(attn_block=8, loss_chunk=7)), ("mebp", {})):
        loss, grads = mesp.compute_gradients(model, ids, labels, mask, method=method, **options)
        assert abs(loss.item() - ref_loss.item()) <= TOL * abs(ref_loss.item())
        assert_grads_close(grads, ref, TOL, f"{quantize} {method}")
    # ... and those are the gradients of a plain model holding the dequantized weights
    twin_loss, twin = mesp.compute_gradients(dense_twin(model), ids, labels, mask, method="autograd")
    assert abs(twin_loss.item() - ref_loss.item()) <= TOL * abs(twin_loss.item())
    assert_grads_close(ref, twin, TOL, f"{quantize} autograd vs dequantized twin")


def test_gguf_native_keeps_the_file_quantization(make_hf_model, tmp_path):
    path, stored = tiny_gguf(make_hf_model, tmp_path)
    dense = mesp.load_model(path)
    native = mesp.load_model(path, quantize="gguf")
    kinds = {name: type(w).__name__ for name, w in native.base_weights()}
    assert kinds["model.embed_tokens.weight"] == "Int4Weight"  # Q4_0, the first 2-D tensor
    assert kinds["model.layers.0.self_attn.q_proj.weight"] == "Int4Weight"  # Q4_1 (permuted rows)
    assert kinds["model.layers.0.self_attn.k_proj.weight"] == "Int8Weight"  # Q8_0 (permuted rows)
    assert kinds["model.layers.0.self_attn.v_proj.weight"] == "Tensor"  # F16 loads dense
    for name, w in native.base_weights():  # the file's values, llama q/k rows un-permuted
        if isinstance(w, quant.FrozenWeight):
            assert relative_error(w.dequantize(), stored[name]) <= 1e-7, name
    ids, _, mask = make_batch(2, 11, native.config.vocab_size, "right")
    assert relative_error(mesp.forward(native, ids, mask), mesp.forward(dense, ids, mask)) <= 1e-6
    resident = sum(w.nbytes if isinstance(w, quant.FrozenWeight) else w.numel() * 4 for _, w in native.base_weights())
    assert resident < 0.5 * sum(w.numel() * 4 for _, w in dense.base_weights())


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_logit_error_against_fp32(make_hf_model, arch):
    """Quantization error of the logits on a tiny random model. Random weights amplify weight error (Gaussian
    noise of the same size per matrix gives the same logit error), so these are loose bounds: measured
    qwen2 2.2e-2 (int8) and 2.3e-1 (int4), for weight errors of 0.6% and 7.8%."""
    path, _ = make_hf_model(arch, num_key_value_heads=2)
    ids, _, mask = make_batch(2, 24, 96, "left", seed=4)
    ref = mesp.forward(mesp.load_model(path), ids, mask)
    errs = {q: relative_error(mesp.forward(mesp.load_model(path, quantize=q), ids, mask), ref)
            for q in ("int8", "int4")}
    print(f"\n{arch}: logits relative error vs fp32: int8 {errs['int8']:.2e}, int4 {errs['int4']:.2e}")
    assert 0 < errs["int8"] < 0.05 and 3 * errs["int8"] < errs["int4"] < 0.4, errs
    bf16 = mesp.load_model(path, dtype=torch.bfloat16, quantize="int4")  # kernels in forward
    assert relative_error(mesp.forward(bf16, ids, mask).float(), ref) < errs["int4"] + 0.05


def test_random_preset_is_quantized_block_by_block(monkeypatch):
    """A random preset quantized as it is drawn equals the dense preset quantized afterwards: the seeded draws
    do not depend on the block size, so the full-precision weights never need to exist."""
    hf = dict(architectures=["Qwen2ForCausalLM"], vocab_size=160, hidden_size=64, intermediate_size=96,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    dense = load_random("tiny", hf, torch.float32, "cpu")
    monkeypatch.setattr(quant, "QUANT_BLOCK_ELEMENTS", 64 * 40)  # blocks of 48 / 64 rows, not whole matrices
    for mode in ("int8", "int4"):
        model = load_random("tiny", hf, torch.float32, "cpu", quantize=mode)
        weights = dict(model.base_weights())
        for name, w in dense.base_weights():
            got = weights[name]
            if w.dim() == 1:
                assert torch.equal(got, w)
                continue
            cls = quant.Int4Weight if isinstance(got, quant.Int4Weight) else quant.Int8Weight
            assert mode == "int4" or cls is quant.Int8Weight
            assert torch.equal(got.dequantize(), cls.quantize(w, w.shape).dequantize()), name
    assert isinstance(weights["model.embed_tokens.weight"], quant.Int8Weight)  # tables stay int8 under int4


@pytest.mark.parametrize("shard", [None, "40KB"])
def test_lazy_weights_read_from_disk(make_hf_model, shard, monkeypatch):
    path, _ = make_hf_model("qwen2", max_shard_size=shard, num_key_value_heads=2)
    dense = with_lora(mesp.load_model(path))
    # quantizing a HF directory reads each matrix from its file in blocks of rows (no memory map)
    monkeypatch.setattr(quant, "QUANT_BLOCK_ELEMENTS", 64 * 40)
    quantized = dict(mesp.load_model(path, quantize="int8").base_weights())
    for name, w in dense.base_weights():
        want = quant.Int8Weight.quantize(w, w.shape).dequantize() if w.dim() == 2 else w
        got = quantized[name].dequantize() if w.dim() == 2 else quantized[name]
        assert torch.equal(got, want), name
    lazy = with_lora(mesp.load_model(path, lazy=True))
    matrices = [w for _, w in lazy.base_weights() if w.dim() == 2]
    assert matrices and all(isinstance(w, LazyWeight) and w.nbytes == 0 for w in matrices)
    ids, labels, mask = make_batch(3, 13, lazy.config.vocab_size, "right", seed=1)
    assert torch.equal(mesp.forward(lazy, ids, mask), mesp.forward(dense, ids, mask))
    ref_loss, ref = mesp.compute_gradients(dense, ids, labels, mask, method="autograd")
    for method in ("mesp", "mebp", "autograd"):
        loss, grads = mesp.compute_gradients(lazy, ids, labels, mask, method=method)
        assert abs(loss.item() - ref_loss.item()) <= TOL * abs(ref_loss.item())
        assert_grads_close(grads, ref, TOL, f"lazy {method}")
    emb = lazy.model.embed_tokens.weight
    rows = torch.tensor([[5, 1, 5], [95, 0, 7]])
    assert torch.equal(emb.rows(rows), dense.model.embed_tokens.weight[rows])
    bf16 = mesp.load_model(path, dtype=torch.bfloat16, lazy=True)
    assert bf16.model.embed_tokens.weight.rows(rows).dtype == torch.bfloat16


def test_load_model_rejects_bad_options(make_hf_model, tmp_path):
    path, _ = make_hf_model("qwen2", num_key_value_heads=2)
    with pytest.raises(MespError, match="quantize: unknown 'int3'"):
        mesp.load_model(path, quantize="int3")
    with pytest.raises(MespError, match="not a GGUF file"):
        mesp.load_model(path, quantize="gguf")
    with pytest.raises(MespError, match="not a GGUF file"):
        mesp.load_model("qwen2.5-0.5b", quantize="gguf")
    with pytest.raises(MespError, match="lazy=True"):
        mesp.load_model("qwen2.5-0.5b", lazy=True)
    with pytest.raises(MespError, match="choose one"):
        mesp.load_model(path, lazy=True, quantize="int8")
    assert isinstance(mesp.load_model(path, quantize="none").model.embed_tokens.weight, torch.Tensor)


def test_cli_quantize_flag():
    from mesp.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["generate", "--model", "m", "--prompt", "p", "--quantize", "int4"])
    assert args.quantize == "int4"
    assert parser.parse_args(["generate", "--model", "m", "--prompt", "p"]).quantize == "none"
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--model", "m", "--prompt", "p", "--quantize", "int3"])


@pytest.mark.parametrize("capability", list(CAPABILITIES))
def test_packed_layouts_hold_under_every_cpu_capability(capability):
    """PyTorch's packed int4 layout follows the kernels the CPU dispatches to (row blocks of 32 rows with AVX2,
    64 with AVX-512, pairs without vectorisation), so the layout and product tests rerun under each capability
    this CPU can execute. One it lacks is skipped, never forced: PyTorch does not fall back, the child dies of
    SIGILL."""
    if capability not in kernel_capabilities():
        pytest.skip(f"this CPU cannot execute ATEN_CPU_CAPABILITY={capability} kernels "
                    f"(it runs {', '.join(kernel_capabilities())})")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    tests = str(Path(__file__))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", tests, "-k",
                           "kernel_layout_round_trip or products_match_the_dequantized_matrix"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
