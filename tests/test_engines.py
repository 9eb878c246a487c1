"""The gradient engines (autograd, MeBP, MeSP, MeZO) against each other and against PEFT + transformers.

The reference is transformers' own model and loss (`labels=`) with PEFT's LoRA holding the same random A and
non-zero B as ours, differentiated by autograd. Every exact method must match it per tensor to fp32 relative
error 1e-5 (||a - b|| / ||b||), and the loss to 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import IGNORE, assert_grads_close, make_batch, randomize_lora_b, relative_error

import mesp
from mesp.families import FAMILIES, ModelConfig
from mesp.lora import adapter_state
from mesp.methods.mesp import layer_forward, layer_recompute
from mesp.model import LayerRun, SdpaMasks
from mesp.testing import cosine

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

TOL = 1e-5
EXACT = ("autograd", "mebp", "mesp")


# Tiny architectures by GQA ratio (query heads per key/value head); ratio 3 needs 6 heads, so hidden 48.
GQA = {1: dict(num_attention_heads=4, num_key_value_heads=4),
       2: dict(num_attention_heads=4, num_key_value_heads=2),
       3: dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=48)}


def model_dir(make_hf_model, arch: str, gqa: int = 2, tied: bool = False, **extra):
    path, _ = make_hf_model(arch, **GQA[gqa], tie_word_embeddings=tied, **extra)
    return path


def our_model(path, targets=None, r: int = 8, alpha: float = 16, dtype=torch.float32, seed: int = 0, device="cpu"):
    """mesp model with LoRA: A as add_lora initialises it, B random and non-zero (B = 0 would hide errors)."""
    model = mesp.load_model(path, dtype=dtype, device=device)
    mesp.add_lora(model, mesp.LoraConfig(r=r, alpha=alpha, target_modules=targets or list(mesp.lora.ALL_TARGETS)),
                  seed=seed)
    return randomize_lora_b(model, seed, std=0.1)


def peft_reference(path, model, input_ids, labels, attention_mask):
    """(loss, grads) of transformers + PEFT with `model`'s LoRA weights copied in by PEFT key."""
    import peft
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    cfg = model.lora_config
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=cfg.target_modules,
                                                 lora_dropout=0.0))
    params = {k.replace(".default.weight", ".weight"): p for k, p in pm.named_parameters() if p.requires_grad}
    ours = adapter_state(model)
    assert set(params) == set(ours), sorted(set(params) ^ set(ours))[:4]
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(ours[k].float())
    out = pm(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    out.loss.backward()
    return out.loss.detach(), {k: p.grad for k, p in params.items()}


CASES = [
    ("qwen2", 2, False, {}, None, 8, 3, 37, "left", 16, 7),
    ("qwen2", 1, True, {}, ["q_proj", "v_proj"], 1, 1, 2, None, 16, 5),
    ("qwen2", 3, False, {}, ["gate_proj", "up_proj", "down_proj"], 8, 3, 40, "right", 16, 13),
    ("qwen2", 3, True, {}, ["k_proj", "o_proj"], 1, 3, 16, "left", 16, None),
    ("llama", 2, True, {}, None, 1, 3, 33, "right", 16, 11),
    ("llama", 1, False, {}, ["q_proj", "v_proj"], 8, 3, 17, "left", 16, 3),
    ("llama", 3, False, {}, None, 8, 1, 40, None, 16, 9),
    ("llama", 2, False, {"attention_bias": True}, ["o_proj", "down_proj"], 8, 3, 5, "left", None, None),
    # sliding windows shorter than T beside full-attention layers, q/k norms, a head_dim of its own, NoPE layers
    ("qwen2", 2, False, {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}, None, 8, 2, 20,
     "left", 8, None),
    ("qwen3", 2, False, {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}, None, 8, 3, 37,
     "left", 16, 7),
    ("qwen3", 3, True, {"head_dim": 8}, ["q_proj", "k_proj", "o_proj"], 4, 2, 20, "right", 8, None),
    ("qwen3", 1, False, {"attention_bias": True}, None, 8, 2, 64, "left", 16, None),
    ("smollm3", 2, False, {"no_rope_layer_interval": 2}, None, 8, 3, 33, "left", 16, 11),
    ("smollm3", 1, True, {"no_rope_layer_interval": 2, "use_sliding_window": True, "sliding_window": 5}, None, 4,
     2, 24, "right", 8, None),
    # Gemma 3: (1 + w) norms, sandwich norms, GeGLU, q/k norms, its score scale, local/global RoPE bases,
    # embeddings scaled by sqrt(hidden), logit softcapping
    ("gemma3_text", 2, True, {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"],
                              "query_pre_attn_scalar": 12, "rope_local_base_freq": 500.0}, None, 8, 3, 37, "left",
     16, 7),
    ("gemma3_text", 1, False, {"sliding_window": 6, "layer_types": ["full_attention", "sliding_attention"],
                               "final_logit_softcapping": 3.0}, ["q_proj", "o_proj", "down_proj"], 4, 2, 24, "right",
     8, None),
    ("gemma3_text", 3, True, {"sliding_window": 3, "final_logit_softcapping": 5.0}, None, 8, 2, 64, "left", 16,
     None),
]


@pytest.mark.parametrize("arch,gqa,tied,extra,targets,r,B,T,padding,attn_block,loss_chunk", CASES,
                         ids=[f"{c[0]}-gqa{c[1]}-{'tied' if c[2] else 'untied'}{'-' + '-'.join(c[3]) if c[3] else ''}-"
                              f"{'+'.join(t[:-5] for t in c[4]) if c[4] else 'all'}-r{c[5]}-B{c[6]}-T{c[7]}-"
                              f"{c[8] or 'nopad'}" for c in CASES])
def test_exact_methods_match_peft(make_hf_model, arch, gqa, tied, extra, targets, r, B, T, padding, attn_block,
                                  loss_chunk):
    path = model_dir(make_hf_model, arch, gqa, tied, **extra)
    model = our_model(path, targets, r=r)
    ids, labels, mask = make_batch(B, T, model.config.vocab_size, padding, seed=T, prompt=2 if B > 1 else 0)
    ref_loss, ref = peft_reference(path, model, ids, labels, mask)
    options = {"mesp": {k: v for k, v in (("attn_block", attn_block), ("loss_chunk", loss_chunk)) if v}}
    for method in EXACT:
        loss, grads = mesp.compute_gradients(model, ids, labels, mask, method=method, **options.get(method, {}))
        assert loss.dtype == torch.float32 and loss.dim() == 0
        assert abs(loss.item() - ref_loss.item()) <= TOL * abs(ref_loss.item()), (method, loss, ref_loss)
        assert_grads_close(grads, ref, TOL, method)
        assert all(g.dtype == torch.float32 for g in grads.values())
        assert not any(p.grad is not None for p in model.lora_parameters().values()), f"{method} left .grad set"


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3", "smollm3", "gemma3_text"])
def test_layer_steps_agree_under_module_and_structured_runs(make_hf_model, arch):
    """DecoderLayer.forward's steps run through the modules (LayerRun, SDPA) and through mesp.ops
    (StructuredRun, blockwise attention) give the same output, and layer_recompute keeps what it is made of."""
    model = our_model(model_dir(make_hf_model, arch, 2, attention_bias=True))
    B, T = 2, 11
    ids, _, mask = make_batch(B, T, model.config.vocab_size, "left", seed=4)
    rope = model.rope(torch.arange(T))
    layer = model.model.layers[1]
    with torch.no_grad():
        x = model.embed(ids)
        y_modules = layer(x, LayerRun(rope[1], SdpaMasks(mask, T, 0, x.device)))
        y = layer_forward(layer, x, rope[1], mask.bool(), attn_block=4)
        saved = layer_recompute(layer, x, rope[1], mask.bool(), attn_block=4, store_h=True)
        if layer.spec.sandwich_norms:  # the saved down output d, normed, closes the residual
            y_saved = saved.h1 + layer.post_feedforward_layernorm(saved.d)
        else:
            y_saved = saved.h1 + layer.mlp.down_proj(saved.M)
    # SDPA and the blockwise kernel sum in different orders: compare as whole tensors
    assert relative_error(y, y_modules) < 1e-6
    assert relative_error(y_saved, y) < 1e-6
    assert set(saved.h) == set(layer.projections())
    assert saved.lse.shape == (B, model.config.num_attention_heads, T)


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_family_config_round_trips_through_hf(arch):
    plain = ModelConfig(arch=arch, vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True)
    cfg = ModelConfig.from_hf(plain.to_hf())  # the family's config.json defaults filled in
    hf = cfg.to_hf()
    assert hf["architectures"] == [FAMILIES[arch].hf_class] and hf["model_type"] == arch
    assert ModelConfig.from_hf(hf).to_hf() == hf
    spec = cfg.layer_spec(0)
    assert spec.qkv_bias and spec.o_bias == (arch != "qwen2")  # Qwen2's o_proj never has a bias


@pytest.mark.parametrize("case", CASES[::2], ids=lambda c: f"{c[0]}-gqa{c[1]}-T{c[7]}-{c[8] or 'nopad'}")
def test_exact_methods_agree_in_fp64(make_hf_model, case):
    """In fp64 the structured backward equals autograd to 1e-10: the fp32 tolerance above only absorbs
    rounding (fp32 autograd itself is up to ~5e-6 from the fp64 gradient on these cases)."""
    arch, gqa, tied, extra, targets, r, B, T, padding, attn_block, loss_chunk = case
    path = model_dir(make_hf_model, arch, gqa, tied, **extra)
    model = our_model(path, targets, r=r, dtype=torch.float64)
    ids, labels, mask = make_batch(B, T, model.config.vocab_size, padding, seed=T + 1, prompt=1)
    ref_loss, ref = mesp.compute_gradients(model, ids, labels, mask, method="autograd")
    assert ref_loss.dtype == torch.float64
    for method, options in (("mebp", {}), ("mesp", dict(attn_block=attn_block or 128, loss_chunk=loss_chunk))):
        loss, grads = mesp.compute_gradients(model, ids, labels, mask, method=method, **options)
        assert abs(loss.item() - ref_loss.item()) <= 1e-12 * ref_loss.item(), method
        assert_grads_close(grads, ref, 1e-10, f"fp64 {method}")


def test_left_padding_boundary_label_agrees_across_methods(make_hf_model):
    """With the first real token of a left-padded row labelled (predicted from a pad position), our methods
    still agree with each other exactly: they share the model's pad-row convention."""
    path = model_dir(make_hf_model, "qwen2", 2)
    model = our_model(path)
    ids, labels, mask = make_batch(3, 19, model.config.vocab_size, "left", seed=5)
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE))
    ref_loss, ref = mesp.compute_gradients(model, ids, labels, mask, method="autograd")
    for method, options in (("mebp", {}), ("mesp", dict(attn_block=8, loss_chunk=5))):
        loss, grads = mesp.compute_gradients(model, ids, labels, mask, method=method, **options)
        assert abs(loss.item() - ref_loss.item()) <= TOL * ref_loss.item()
        assert_grads_close(grads, ref, TOL, method)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_bf16_all_methods_finite_and_close_to_fp32(make_hf_model, arch):
    path = model_dir(make_hf_model, arch, 2)
    ids, labels, mask = make_batch(3, 21, 96, "right", seed=1)
    ref_loss, ref = mesp.compute_gradients(our_model(path), ids, labels, mask, method="autograd")
    model = our_model(path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    options = {"mesp": dict(attn_block=8, loss_chunk=7), "mezo": dict(loss_chunk=7)}
    for method in EXACT + ("mezo",):
        loss, grads = mesp.compute_gradients(model, ids, labels, mask, method=method, **options.get(method, {}))
        assert torch.isfinite(loss), method
        assert abs(loss.item() - ref_loss.item()) <= 0.02 * ref_loss.item(), (method, loss, ref_loss)
        assert set(grads) == set(ref)
        # LoRA weights, and so their gradients, stay fp32 under a bf16 base (lora.adapter_dtype)
        assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values()), method
        if method != "mezo":  # a single MeZO direction is not meant to be close (see the MeZO tests)
            assert_grads_close(grads, ref, 0.1, f"bf16 {method}")  # measured ~0.03


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_all_methods_on_cuda_match_cpu(make_hf_model):
    path = model_dir(make_hf_model, "qwen2", 2)
    ids, labels, mask = make_batch(3, 37, 96, "left", seed=6, prompt=1)
    ref_loss, ref = mesp.compute_gradients(our_model(path), ids, labels, mask, method="autograd")
    model = our_model(path, device="cuda")
    assert model.device.type == "cuda" and all(p.is_cuda for p in model.lora_parameters().values())
    for method in EXACT:
        options = dict(attn_block=16, loss_chunk=7) if method == "mesp" else {}
        loss, grads = mesp.compute_gradients(model, ids, labels, mask, method=method, **options)
        assert loss.device.type == "cuda" and all(g.device.type == "cuda" for g in grads.values())
        assert abs(loss.item() - ref_loss.item()) <= 1e-5 * ref_loss.item(), method
        assert_grads_close({k: g.cpu() for k, g in grads.items()}, ref, 1e-4, f"cuda {method}")
    _, est = mesp.compute_gradients(model, ids, labels, mask, method="mezo", n_directions=2)
    assert all(torch.isfinite(e).all() for e in est.values())


def test_on_layer_grads_streams_each_layer_once_in_reverse(make_hf_model):
    path = model_dir(make_hf_model, "llama", 2, num_hidden_layers=3)
    model = our_model(path, ["q_proj", "k_proj", "down_proj"], r=2)
    ids, labels, mask = make_batch(2, 23, 96, "right", seed=2)
    ref_loss, ref = mesp.compute_gradients(model, ids, labels, mask, method="mesp", attn_block=16)
    calls = []

    def on_layer_grads(i, grads):
        calls.append((i, dict(grads)))

    loss, rest = mesp.compute_gradients(model, ids, labels, mask, method="mesp", attn_block=16,
                                        on_layer_grads=on_layer_grads)
    assert [i for i, _ in calls] == [2, 1, 0]
    streamed = {}
    for i, grads in calls:
        layer_keys = {k for k in ref if k.startswith(f"base_model.model.model.layers.{i}.")}
        assert set(grads) == layer_keys and len(layer_keys) == 6, (i, sorted(grads))
        streamed.update(grads)
    assert rest == {}, "with on_layer_grads the gradients are handed over, not also kept"
    assert loss.item() == ref_loss.item()
    assert set(streamed) == set(ref)
    for k in ref:
        assert torch.equal(streamed[k], ref[k]), k


def test_normalizer_scales_loss_and_gradients(make_hf_model):
    path = model_dir(make_hf_model, "qwen2", 2)
    model = our_model(path, r=2)
    ids, labels, mask = make_batch(2, 15, 96, "right", seed=3)
    counted = int((labels[:, 1:] != IGNORE).sum())
    normalizer = 3.0 * counted
    for method in EXACT:
        loss, grads = mesp.compute_gradients(model, ids, labels, mask, method=method)
        loss_n, grads_n = mesp.compute_gradients(model, ids, labels, mask, method=method, normalizer=normalizer)
        assert abs(loss_n.item() - loss.item() / 3) <= TOL * loss.item(), method
        assert_grads_close(grads_n, {k: g / 3 for k, g in grads.items()}, TOL, f"{method} normalizer")
    loss, _ = mesp.compute_gradients(model, ids, labels, mask, method="mezo")
    loss_n, _ = mesp.compute_gradients(model, ids, labels, mask, method="mezo", normalizer=normalizer)
    assert abs(loss_n.item() - loss.item() / 3) <= 1e-4 * loss.item()


def test_compute_gradients_errors(make_hf_model):
    path = model_dir(make_hf_model, "llama", 2)
    ids, labels, mask = make_batch(2, 8, 96, None)
    bare = mesp.load_model(path)
    with pytest.raises(mesp.MespError, match="no LoRA"):
        mesp.compute_gradients(bare, ids, labels)
    model = our_model(path, r=2)
    with pytest.raises(mesp.MespError, match="labels: shape"):
        mesp.compute_gradients(model, ids, labels[:, :-1])
    with pytest.raises(mesp.MespError, match="attention_mask: shape"):
        mesp.compute_gradients(model, ids, labels, mask[:1])
    with pytest.raises(mesp.MespError, match="input_ids: expected"):
        mesp.compute_gradients(model, ids[0], labels[0])
    with pytest.raises(mesp.MespError, match="max_position_embeddings"):
        long = torch.ones(1, model.config.max_position_embeddings + 1, dtype=torch.long)
        mesp.compute_gradients(model, long, long)
    for method in ("autograd", "mesp"):
        with pytest.raises(mesp.MespError, match="no token is labelled"):
            mesp.compute_gradients(model, ids, torch.full_like(ids, IGNORE), method=method)
        with pytest.raises(mesp.MespError, match="no token is labelled"):  # T = 1: nothing to predict
            mesp.compute_gradients(model, ids[:, :1], labels[:, :1], method=method)
    only_first = torch.full_like(ids, IGNORE)
    only_first[:, 0] = ids[:, 0]  # labels shift left: position 0's label is never a target
    with pytest.raises(mesp.MespError, match="no token is labelled"):
        mesp.compute_gradients(model, ids, only_first)
    with pytest.raises(mesp.MespError, match="method: unknown 'sgd'"):
        mesp.compute_gradients(model, ids, labels, method="sgd")
    mesp.add_lora(model, mesp.LoraConfig(r=2, dropout=0.1))
    with pytest.raises(mesp.MespError, match="dropout"):
        mesp.compute_gradients(model, ids, labels)


# ----------------------------------------------------------------------------- MeZO


@pytest.fixture(scope="module")
def mezo_setup(make_hf_model):
    """A model with few LoRA parameters (d = 256), its batch and its true gradient."""
    path = model_dir(make_hf_model, "llama", 2)
    model = our_model(path, ["q_proj"], r=1, seed=7)
    ids, labels, mask = make_batch(2, 12, 96, "right", seed=4)
    loss, truth = mesp.compute_gradients(model, ids, labels, mask, method="autograd")
    d = sum(g.numel() for g in truth.values())
    assert d == 256
    return model, (ids, labels, mask), loss, truth, d


def test_mezo_single_direction_is_nearly_orthogonal(mezo_setup):
    """One SPSA direction gives p z with p ~ g.z, so cos(p z, g) = |g.z| / (|g| |z|): E|cos| = sqrt(2 / (pi d))."""
    model, batch, true_loss, truth, d = mezo_setup
    theory = math.sqrt(2 / (math.pi * d))
    cosines = []
    for seed in range(8):
        loss, est = mesp.compute_gradients(model, *batch, method="mezo", seed=seed)
        assert abs(loss.item() - true_loss.item()) <= 1e-3 * true_loss.item()  # (l+ + l-) / 2 at eps 1e-3
        cosines.append(cosine(est, truth))
    mean_abs = sum(abs(c) for c in cosines) / len(cosines)
    assert max(abs(c) for c in cosines) < 5 * theory, cosines
    assert theory / 3 < mean_abs < 3 * theory, (mean_abs, theory)
    assert all(c > 0 for c in cosines), "p z points along g whatever z is: the sign of p must follow g.z"


def test_mezo_many_directions_approach_the_gradient(mezo_setup):
    """The mean of n estimates is ~ (1/n) sum z z^T g; its cosine with g is ~ sqrt(n / (n + d))."""
    model, batch, _, truth, d = mezo_setup
    n = 256
    _, est = mesp.compute_gradients(model, *batch, method="mezo", n_directions=n, seed=1)
    c = cosine(est, truth)
    assert c > 0.5, c
    assert c > 5 * math.sqrt(2 / (math.pi * d))
    assert abs(c - math.sqrt(n / (n + d))) < 0.1, c
    # and its scale is right: E||estimate||^2 = ||g||^2 (n + d + 1) / n for Gaussian z
    ratio = math.sqrt(sum(float(e.double().norm()) ** 2 for e in est.values()) /
                      sum(float(g.double().norm()) ** 2 for g in truth.values()))
    assert abs(ratio / math.sqrt((n + d + 1) / n) - 1) < 0.25, ratio


def test_mezo_restores_parameters_and_is_reproducible(mezo_setup):
    model, batch, _, _, _ = mezo_setup
    before = {k: p.detach().clone() for k, p in model.lora_parameters().items()}
    loss1, est1 = mesp.compute_gradients(model, *batch, method="mezo", n_directions=3, seed=11)
    drift = max((p - before[k]).abs().max().item() for k, p in model.lora_parameters().items())
    assert drift <= 1e-6, f"parameters moved by {drift:.1e}"  # +eps, -2 eps, +eps: equal up to rounding
    assert all(p.grad is None for p in model.lora_parameters().values())
    with torch.no_grad():  # start again from exactly the same parameters
        for k, p in model.lora_parameters().items():
            p.copy_(before[k])
    loss2, est2 = mesp.compute_gradients(model, *batch, method="mezo", n_directions=3, seed=11)
    assert loss1.item() == loss2.item()
    assert all(torch.equal(est1[k], est2[k]) for k in est1)
    _, est3 = mesp.compute_gradients(model, *batch, method="mezo", n_directions=3, seed=12)
    assert not all(torch.equal(est1[k], est3[k]) for k in est1)
