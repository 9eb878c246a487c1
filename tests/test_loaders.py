"""mesp.load_model against transformers: HF safetensors dirs, GGUF files, presets, and every bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import hf_config, llama3_rope_freqs, write_gguf

import mesp
from mesp.cli import main
from mesp.errors import MespError
from mesp.formats.gguf import gguf_to_hf_name
from mesp.loaders import load_model
from mesp.presets import PRESETS, list_presets
from mesp.tokenizer import load_tokenizer

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 10000.0}


def batch(vocab: int, padding: str | None, B: int = 3, T: int = 9, seed: int = 0):
    """input_ids [B, T] and attention_mask (rows of different real lengths, padded left or right)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if padding is not None:
        for b, n_pad in enumerate([0, 3, 5][:B]):
            if n_pad:
                if padding == "left":
                    mask[b, :n_pad] = 0
                else:
                    mask[b, T - n_pad:] = 0
        ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def compare_logits(path, hf_model, padding=None):
    model = load_model(path)
    ids, mask = batch(hf_model.config.vocab_size, padding)
    with torch.no_grad():
        ref = hf_model(input_ids=ids, attention_mask=mask).logits
        ours = model(ids, mask)[0]
    real = mask.bool()
    diff = (ref[real] - ours[real]).abs().max().item()
    assert diff <= 1e-4, diff
    return model


HF_CASES = [
    pytest.param("qwen2", dict(num_key_value_heads=4), None, None, id="qwen2-gqa1-untied"),
    pytest.param("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True), "left", None,
                 id="qwen2-gqa2-tied-leftpad"),
    pytest.param("qwen2", dict(num_key_value_heads=1), "right", "30KB", id="qwen2-gqa4-rightpad-sharded"),
    pytest.param("llama", dict(num_key_value_heads=1, tie_word_embeddings=True), "right", None,
                 id="llama-gqa4-tied-rightpad"),
    pytest.param("llama", dict(num_key_value_heads=2, attention_bias=True), "left", None, id="llama-bias"),
    pytest.param("llama", dict(num_key_value_heads=4, rope_parameters=LLAMA3_ROPE), "left", "40KB",
                 id="llama-llama3rope-sharded"),
]


@pytest.mark.parametrize("arch,overrides,padding,shard", HF_CASES)
def test_hf_logits_match_transformers(make_hf_model, arch, overrides, padding, shard):
    path, hf_model = make_hf_model(arch, max_shard_size=shard, **overrides)
    if shard:
        assert (path / "model.safetensors.index.json").is_file()
        assert len(list(path.glob("*.safetensors"))) > 1
    model = compare_logits(path, hf_model, padding)
    assert model.source == str(path) and model.tokenizer_source == ("hf", str(path))
    assert model.num_parameters() == sum(p.numel() for p in hf_model.parameters())
    if overrides.get("rope_parameters"):
        assert model.config.rope_scaling["rope_type"] == "llama3"


def test_hf_dtype_and_tied_lm_head_ignored(make_hf_model, tmp_path):
    path, hf_model = make_hf_model("qwen2", tie_word_embeddings=True)
    model = load_model(path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert all(w.dtype == torch.bfloat16 for _, w in model.base_weights())
    assert model.lm_head is None and model.lm_head_weight is model.model.embed_tokens.weight
    # a tied checkpoint that carries lm_head.weight anyway: ignored
    from safetensors.torch import load_file, save_file

    d = tmp_path / "tied_extra"
    shutil.copytree(path, d)
    sd = load_file(d / "model.safetensors")
    sd["lm_head.weight"] = torch.zeros_like(sd["model.embed_tokens.weight"])
    save_file(sd, d / "model.safetensors")
    compare_logits(d, hf_model)


# ---- GGUF ---------------------------------------------------------------------------------------------

def test_smollm2_gguf_matches_transformers(smollm2_model, smollm2_gguf):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                              dtype=torch.float32).eval()
    cfg = smollm2_model.config
    assert (cfg.arch, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == ("llama", 576, 30, 3)
    assert cfg.tie_word_embeddings and cfg.vocab_size == 49152 and cfg.rope_theta == 100000.0
    ids = torch.tensor([[1, 504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767]])
    with torch.no_grad():
        ref = hf(ids).logits
        ours = smollm2_model(ids)[0]
    assert (ref - ours).abs().max().item() <= 1e-4


def _reference_with(hf_model, stored):
    import copy

    ref = copy.deepcopy(hf_model)
    ref.load_state_dict(stored, strict=False)
    if hf_model.config.tie_word_embeddings:
        ref.tie_weights()
    return ref.eval()


def _gguf_types():
    import gguf

    Q = gguf.GGMLQuantizationType
    return Q


@pytest.mark.parametrize("arch,overrides,qnames", [
    ("llama", dict(num_key_value_heads=2), ["F16", "Q8_0", "Q4_0", "Q4_1", "BF16", "F32"]),
    ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE), ["Q8_0"]),
    ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True), ["Q4_0", "F16"]),
])
def test_tiny_gguf_matches_reference(make_hf_model, tmp_path, arch, overrides, qnames):
    Q = _gguf_types()
    _, hf_model = make_hf_model(arch, **overrides)
    freqs = None
    if "rope_parameters" in overrides:
        freqs = llama3_rope_freqs(LLAMA3_ROPE, hf_model.config.head_dim, 10000.0)
    path = tmp_path / f"tiny-{arch}.gguf"
    stored = write_gguf(path, hf_model, [Q[n] for n in qnames], rope_freqs=freqs)
    ref = _reference_with(hf_model, stored)
    model = load_model(path)
    assert model.tokenizer_source == ("gguf", str(path))
    assert model.config.tie_word_embeddings == hf_model.config.tie_word_embeddings
    if freqs is not None:
        sc = model.config.rope_scaling
        assert sc["rope_type"] == "llama3" and sc["factor"] == 8.0 and sc["original_max_position_embeddings"] == 64
    ids, mask = batch(hf_model.config.vocab_size, "left")
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = model(ids, mask)[0]
    assert (want[mask.bool()] - got[mask.bool()]).abs().max().item() <= 1e-4
    # a permutation bug would still give close-ish logits at these scales: check the weights themselves
    q = model.get_submodule("model.layers.0.self_attn.q_proj").weight  # streamed: GGUF's default
    assert torch.equal(q.dequantize(), stored["model.layers.0.self_attn.q_proj.weight"])


def test_gguf_name_map():
    assert gguf_to_hf_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    assert gguf_to_hf_name("blk.0.attn_q.bias") == "model.layers.0.self_attn.q_proj.bias"
    assert gguf_to_hf_name("output.weight") == "lm_head.weight"
    assert gguf_to_hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf_to_hf_name("blk.0.ffn_gate_exps.weight") is None


# ---- presets --------------------------------------------------------------------------------------------

def test_presets_listed():
    names = [n for n, _ in list_presets()]
    assert names == list(PRESETS) and {"smollm2-135m-instruct", "qwen2.5-0.5b", "qwen2.5-1.5b",
                                       "qwen2.5-3b"} <= set(names)


def _count(hf: dict) -> int:
    d, f, L, V = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"], hf["vocab_size"]
    hd = d // hf["num_attention_heads"]
    kv = hf["num_key_value_heads"] * hd
    per_layer = d * d + d + 2 * (d * kv + kv) + d * d + 3 * d * f + 2 * d
    return V * d + L * per_layer + d


def test_preset_configs():
    assert _count(PRESETS["qwen2.5-0.5b"]["config"]) == 494_032_768
    assert _count(PRESETS["qwen2.5-1.5b"]["config"]) == 1_543_714_304
    assert _count(PRESETS["qwen2.5-3b"]["config"]) == 3_085_938_688


@pytest.mark.parametrize("name,published", [
    ("qwen3-0.6b", 596_049_920), ("qwen3-1.7b", 1_720_574_976), ("qwen3-4b", 4_022_468_096),
    ("llama3.2-1b", 1_235_814_400), ("llama3.2-3b", 3_212_749_824), ("smollm3-3b", 3_075_098_624),
    ("gemma3-1b", 999_885_952),
])
def test_new_family_presets_have_the_published_parameter_counts(name, published):
    """Counted from the shapes the model would be built with (tied embeddings once), before any weight exists;
    the published counts are those of the models' own safetensors."""
    import math

    from mesp.families import ModelConfig, expected_shapes

    cfg = ModelConfig.from_hf(PRESETS[name]["config"])
    assert sum(math.prod(s) for s in expected_shapes(cfg).values()) == published


def test_qwen25_05b_preset_parameter_count():
    model = load_model("qwen2.5-0.5b", dtype=torch.bfloat16)
    assert model.num_parameters() == 494_032_768
    assert model.dtype == torch.bfloat16 and model.config.tie_word_embeddings
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.05)
    with pytest.raises(MespError, match="no tokenizer"):
        load_tokenizer(model)


def test_public_api():
    assert mesp.load_model is load_model and mesp.load_tokenizer is load_tokenizer
    assert callable(mesp.generate)


# ---- bad input: one line on stderr, exit status 2 -------------------------------------------------------

def run_cli_error(capsys, model, *extra):
    capsys.readouterr()  # drop what fixtures printed
    rc = main(["generate", "--model", str(model), "--prompt", "hi", "--max-new-tokens", "2", *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _write_hf(tmp_path, make_hf_model, name, edit):
    """A copy of a tiny Qwen2 checkpoint whose state dict / config `edit` changes."""
    from safetensors.torch import load_file, save_file

    path, _ = make_hf_model("qwen2", num_key_value_heads=2)
    d = tmp_path / name
    shutil.copytree(path, d)
    sd = load_file(d / "model.safetensors")
    cfg = json.loads((d / "config.json").read_text())
    edit(sd, cfg)
    save_file(sd, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_bad_paths(capsys, tmp_path):
    assert "no such file" in run_cli_error(capsys, tmp_path / "nope" / "model")
    assert "no config.json" in run_cli_error(capsys, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert "missing field 'num_attention_heads'" in run_cli_error(capsys, tmp_path)
    (tmp_path / "config.json").write_text(hf_config("llama").to_json_string())
    assert "no *.safetensors" in run_cli_error(capsys, tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    assert "config.json" in run_cli_error(capsys, tmp_path)
    assert "unknown model 'qwen9-7b'" in run_cli_error(capsys, "qwen9-7b")
    (tmp_path / "weights.bin").write_bytes(b"x")
    assert "not a model directory" in run_cli_error(capsys, tmp_path / "weights.bin")


def test_bad_architecture(capsys, tmp_path, make_hf_model):
    def edit(sd, cfg):
        cfg["architectures"] = ["GPT2LMHeadModel"]
    d = _write_hf(tmp_path, make_hf_model, "gpt2", edit)
    assert "unsupported architecture 'GPT2LMHeadModel'" in run_cli_error(capsys, d)


def test_bad_tensors(capsys, tmp_path, make_hf_model):
    d = _write_hf(tmp_path, make_hf_model, "missing", lambda sd, cfg: sd.pop("model.layers.1.mlp.up_proj.weight"))
    assert "missing tensor 'model.layers.1.mlp.up_proj.weight'" in run_cli_error(capsys, d)

    def wrong_shape(sd, cfg):
        sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    d = _write_hf(tmp_path, make_hf_model, "shape", wrong_shape)
    msg = run_cli_error(capsys, d)
    assert "'model.layers.0.self_attn.k_proj.weight'" in msg and "(16, 64)" in msg and "(32, 64)" in msg

    def unknown(sd, cfg):
        sd["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    d = _write_hf(tmp_path, make_hf_model, "unknown", unknown)
    assert "unknown tensor 'model.layers.0.mlp.extra.weight'" in run_cli_error(capsys, d)


def test_corrupt_files(capsys, tmp_path, make_hf_model):
    path, _ = make_hf_model("qwen2", num_key_value_heads=2)
    d = tmp_path / "corrupt"
    shutil.copytree(path, d)
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!")
    msg = run_cli_error(capsys, d)
    assert "model.safetensors" in msg and "unreadable" in msg
    g = tmp_path / "bad.gguf"
    g.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    msg = run_cli_error(capsys, g)
    assert "bad.gguf" in msg and "unreadable" in msg
    g.write_bytes(b"not a gguf file at all")
    assert "unreadable" in run_cli_error(capsys, g)


def test_bad_gguf_contents(capsys, tmp_path, make_hf_model):
    Q = _gguf_types()
    _, hf_model = make_hf_model("llama", num_key_value_heads=2)
    g = tmp_path / "int.gguf"
    write_gguf(g, hf_model, [Q.F32], extra_tensors={"blk.0.attn_q_norm.weight": np.zeros(4, np.float32)})
    assert "unknown tensor 'blk.0.attn_q_norm.weight'" in run_cli_error(capsys, g)
    import gguf

    # an integer tensor where a weight should be: unsupported type
    w = gguf.GGUFWriter(str(tmp_path / "i32.gguf"), "llama")
    for k, v in dict(block_count=1, embedding_length=8, feed_forward_length=8, head_count=2).items():
        getattr(w, f"add_{k}")(v)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.int32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    assert "unsupported GGUF tensor type I32" in run_cli_error(capsys, tmp_path / "i32.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    assert "unsupported architecture 'gpt2'" in run_cli_error(capsys, tmp_path / "gpt2.gguf")


def test_random_preset_has_no_tokenizer(capsys):
    assert "no tokenizer" in run_cli_error(capsys, "qwen2.5-0.5b", "--dtype", "bfloat16")


def test_bad_generation_args(capsys, make_hf_model):
    path, _ = make_hf_model("qwen2", num_key_value_heads=2)
    assert "max_new_tokens" in run_cli_error(capsys, path, "--max-new-tokens", "-1")
    assert "temperature" in run_cli_error(capsys, path, "--temperature", "-0.5")
    assert "top_p" in run_cli_error(capsys, path, "--top-p", "0")
    assert "tokenizer" in run_cli_error(capsys, path)  # a tiny checkpoint without tokenizer files


@pytest.mark.parametrize("field, value, expected", [
    ("num_hidden_layers", 10 ** 9, "num_hidden_layers 1000000000 is out of range"),
    ("hidden_size", 0, "hidden_size 0 is out of range"),
    ("num_attention_heads", 0, "num_attention_heads 0 is out of range"),
    ("num_key_value_heads", -2, "num_key_value_heads -2 is out of range"),
    ("vocab_size", "32000", "vocab_size must be an integer"),
    ("intermediate_size", 1.5, "intermediate_size must be an integer"),
    ("head_dim", 10 ** 12, "head_dim 1000000000000 is out of range"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps must be a finite positive number"),
    ("rope_theta", -1.0, "rope_theta must be a finite positive number"),
    ("rope_scaling", "linear", "rope_scaling must be an object"),
])
def test_config_sizes_checked_before_anything_is_built(capsys, tmp_path, make_hf_model, field, value, expected):
    def edit(sd, cfg):
        cfg[field] = value
    d = _write_hf(tmp_path, make_hf_model, field, edit)
    msg = run_cli_error(capsys, d)
    assert "config.json" in msg and expected in msg


def test_absurd_config_is_rejected_under_a_tight_memory_limit(tmp_path, make_hf_model):
    """Rejecting a config that asks for 10^9 layers allocates nothing: under a 1 GiB address-space limit (far
    below what building such a model would take) the child ends with the one-line error, not MemoryError."""
    import subprocess
    import sys

    def edit(sd, cfg):
        cfg["num_hidden_layers"] = 10 ** 9
        cfg["hidden_size"] = 1 << 20
    d = _write_hf(tmp_path, make_hf_model, "absurd", edit)
    child = ("import resource, sys; from mesp.cli import main; "
             "resource.setrlimit(resource.RLIMIT_AS, (3 << 30, resource.RLIM_INFINITY)); "
             f"sys.exit(main(['generate', '--model', {str(d)!r}, '--prompt', 'x']))")
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "out of range" in lines[0] and "Traceback" not in r.stderr


@pytest.mark.parametrize("key,value,expected", [
    ("head_count", 0, "num_attention_heads 0 is out of range"),
    ("block_count", 10 ** 9, "num_hidden_layers 1000000000 is out of range"),
    ("embedding_length", 1 << 30, "hidden_size 1073741824 is out of range"),
])
def test_gguf_sizes_checked_before_anything_is_built(capsys, tmp_path, key, value, expected):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "sizes.gguf"), "qwen2")
    sizes = dict(block_count=1, embedding_length=8, feed_forward_length=8, head_count=2, context_length=64)
    for k, v in {**sizes, key: value}.items():
        getattr(w, f"add_{k}")(v)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    msg = run_cli_error(capsys, tmp_path / "sizes.gguf")
    assert "sizes.gguf" in msg and expected in msg
