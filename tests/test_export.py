"""GGUF export: llama.cpp's LoRA adapter file and the merged model as one GGUF file, checked against mesp's own
merge and read back with the gguf package's reader and mesp's loader."""

from __future__ import annotations

import json
import os

import gguf
import numpy as np
import pytest
import torch
from test_merge import ids_for, random_adapter

import mesp
from mesp.cli import main
from mesp.errors import MespError
from mesp.export import export_gguf_lora, merge_gguf
from mesp.formats.gguf import unpermute
from mesp.formats.gguf_writer import permute
from mesp.loaders import load_model
from mesp.merge import merge_adapter, merged_weights
from mesp.quantize import quantize_model
from mesp.testing import relative_error

Q = gguf.GGMLQuantizationType
LLAMA = {"num_key_value_heads": 2}  # 4 q heads, 2 kv heads: the q and k permutations differ
GEMMA = {"query_pre_attn_scalar": 16}  # llama.cpp scales Gemma 3's scores by head_dim (64 / 4 here)


def saved_adapter(hf_dir, tmp_path, targets=None, r=4, alpha=8):
    """A random adapter for the model at hf_dir (every A and B non-zero): (adapter dir, model carrying it)."""
    model = random_adapter(load_model(hf_dir), targets=targets, r=r, alpha=alpha)
    mesp.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter", model


def gguf_arrays(path) -> dict[str, tuple[Q, np.ndarray]]:
    """name -> (type, values in transformers' [out, in] order as fp32) of every tensor of a GGUF file."""
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        out[t.name] = (t.tensor_type, np.asarray(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(shape))
    return out


def field(path, key):
    return gguf.GGUFReader(str(path)).fields[key].contents()


def no_temporaries(directory):
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("arch,overrides,permuted", [("llama", LLAMA, True), ("qwen2", {}, False)])
def test_lora_file_holds_the_peft_tensors(make_hf_model, tmp_path, arch, overrides, permuted):
    path, _ = make_hf_model(arch, **overrides)
    adapter, model = saved_adapter(path, tmp_path, r=4, alpha=8)
    out = tmp_path / "adapter.gguf"
    r = export_gguf_lora(path, adapter, out)
    assert r.lora_modules == 2 * 7 and r.tensors == 2 * 2 * 7 and os.path.getsize(out) == r.bytes
    assert field(out, "general.type") == "adapter" and field(out, "adapter.type") == "lora"
    assert field(out, "adapter.lora.alpha") == 8.0 and field(out, "general.architecture") == arch
    got = gguf_arrays(out)
    cfg = model.config
    want_names = set()
    for name, m in model.named_modules():
        if not getattr(m, "has_lora", False):
            continue
        _, _, layer, _, proj = name.split(".")  # model.layers.<i>.<self_attn|mlp>.<proj>
        gguf_name = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                     "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[proj]
        base = f"blk.{layer}.{gguf_name}.weight"
        want_names |= {base + ".lora_a", base + ".lora_b"}
        (ta, a), (tb, b) = got[base + ".lora_a"], got[base + ".lora_b"]
        assert ta == tb == Q.F32
        assert a.shape == (4, m.in_features) and b.shape == (m.out_features, 4)  # GGUF dims [in, r], [r, out]
        np.testing.assert_array_equal(a, m.lora_A.detach().numpy())
        heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(proj)
        want_b = m.lora_B.detach().numpy()
        if permuted and heads:
            want_b = permute(want_b, heads)
            assert not np.array_equal(want_b, m.lora_B.detach().numpy())  # the permutation is not the identity
        np.testing.assert_array_equal(b, want_b)
    assert set(got) == want_names


def test_lora_applied_to_the_base_gguf_gives_the_merged_weights(make_hf_model, tmp_path):
    """llama.cpp's view: W_gguf + alpha / r * B_gguf A_gguf on the base GGUF's (permuted) rows, de-permuted, is
    mesp's merge W + alpha / r * B A."""
    path, _ = make_hf_model("llama", **LLAMA)
    base_gguf = tmp_path / "base.gguf"
    quantize_model(path, "f32", base_gguf)
    adapter, model = saved_adapter(path, tmp_path, targets=["q_proj", "k_proj", "down_proj"], r=4, alpha=12)
    export_gguf_lora(base_gguf, adapter, tmp_path / "adapter.gguf")
    base, lora = gguf_arrays(base_gguf), gguf_arrays(tmp_path / "adapter.gguf")
    alpha = field(tmp_path / "adapter.gguf", "adapter.lora.alpha")
    want = dict(merged_weights(model, torch.float32))
    cfg = model.config
    checked = 0
    for layer in range(cfg.num_hidden_layers):
        for gname, hname, heads in (("attn_q", "self_attn.q_proj", cfg.num_attention_heads),
                                    ("attn_k", "self_attn.k_proj", cfg.num_key_value_heads),
                                    ("ffn_down", "mlp.down_proj", None)):
            g = f"blk.{layer}.{gname}.weight"
            a, b = lora[g + ".lora_a"][1], lora[g + ".lora_b"][1]
            merged = torch.from_numpy(base[g][1] + alpha / a.shape[0] * (b @ a))
            if heads:
                merged = unpermute(merged, heads)
            ref = want[f"model.layers.{layer}.{hname}.weight"]
            assert relative_error(merged, ref) < 1e-6, g
            checked += 1
    assert checked == 3 * cfg.num_hidden_layers


def test_q8_0_and_f16_outtypes(make_hf_model, tmp_path):
    path, _ = make_hf_model("qwen2")
    adapter, model = saved_adapter(path, tmp_path, targets=["v_proj"], r=4)
    for outtype, type_a, type_b in (("q8_0", Q.Q8_0, Q.F16), ("f16", Q.F16, Q.F16)):
        out = tmp_path / f"{outtype}.gguf"
        export_gguf_lora(path, adapter, out, outtype=outtype)
        got = gguf_arrays(out)
        proj = model.model.layers[0].self_attn.v_proj
        (ta, a), (tb, b) = got["blk.0.attn_v.weight.lora_a"], got["blk.0.attn_v.weight.lora_b"]
        assert (ta, tb) == (type_a, type_b)  # rank 4 rows cannot be whole Q8_0 blocks: f16, as llama.cpp does
        assert relative_error(torch.from_numpy(a), proj.lora_A.detach()) < 1e-2
        assert relative_error(torch.from_numpy(b), proj.lora_B.detach()) < 1e-3


@pytest.mark.parametrize("arch,overrides", [("llama", LLAMA), ("qwen2", {"tie_word_embeddings": True}),
                                            ("qwen3", {}), ("gemma3_text", GEMMA)])
def test_merged_gguf_reads_back_as_the_merged_model(make_hf_model, tmp_path, arch, overrides):
    path, _ = make_hf_model(arch, **overrides)
    adapter, _ = saved_adapter(path, tmp_path)
    merge_adapter(path, adapter, tmp_path / "merged")
    ids = ids_for(96)
    want = mesp.forward(load_model(tmp_path / "merged"), ids)
    r = merge_gguf(path, adapter, tmp_path / "m.f32.gguf", quantize="f32")
    assert r.lora_modules == 14
    got = mesp.forward(load_model(tmp_path / "m.f32.gguf"), ids)
    assert relative_error(got, want) < 1e-5
    merge_gguf(path, adapter, tmp_path / "m.q8_0.gguf", quantize="q8_0")
    q8_error = relative_error(mesp.forward(load_model(tmp_path / "m.q8_0.gguf"), ids), want)
    adapter_effect = relative_error(mesp.forward(load_model(path), ids), want)
    # Q8_0 rounds each weight to 1/127 of its block's largest: a few percent on these random models' logits,
    # well below what the adapter changes (so the adapter is there, and quantized, not lost)
    assert q8_error < 5e-2 and q8_error < adapter_effect / 4, (q8_error, adapter_effect)
    assert field(tmp_path / "m.q8_0.gguf", "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0


@pytest.mark.parametrize("arch,overrides", [("qwen3", {}), ("gemma3_text", GEMMA)])
def test_quantize_f32_round_trip_of_qwen3_and_gemma3(make_hf_model, tmp_path, arch, overrides):
    path, _ = make_hf_model(arch, **overrides)
    out = tmp_path / "m.gguf"
    quantize_model(path, "f32", out)
    assert field(out, "general.architecture") == {"gemma3_text": "gemma3"}.get(arch, arch)
    names = {t.name for t in gguf.GGUFReader(str(out)).tensors}
    assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= names
    if arch == "gemma3_text":
        assert {"blk.0.post_attention_norm.weight", "blk.0.post_ffw_norm.weight", "blk.0.ffn_norm.weight"} <= names
        stored = gguf_arrays(out)["blk.0.attn_norm.weight"][1]
        w = load_model(path).model.layers[0].input_layernorm.weight
        np.testing.assert_allclose(stored, 1.0 + w.numpy(), rtol=1e-6)  # llama.cpp stores Gemma's 1 + w
    ids = ids_for(96)
    assert relative_error(mesp.forward(load_model(out), ids), mesp.forward(load_model(path), ids)) < 1e-5


def test_gemma3_settings_llama_cpp_hard_codes_are_checked(make_hf_model, tmp_path):
    path, _ = make_hf_model("gemma3_text")  # query_pre_attn_scalar 256, head_dim 16
    with pytest.raises(MespError, match="query_pre_attn_scalar"):
        quantize_model(path, "f32", tmp_path / "g.gguf")
    assert not list(tmp_path.iterdir())


def test_merge_from_a_gguf_source_keeps_its_metadata(make_hf_model, tmp_path):
    path, _ = make_hf_model("llama", **LLAMA)
    base = tmp_path / "base.gguf"
    quantize_model(path, "q8_0", base)
    adapter, _ = saved_adapter(path, tmp_path)
    merge_gguf(base, adapter, tmp_path / "m.gguf", quantize="f32")
    ids = ids_for(96)
    want = mesp.forward(mesp.load_adapter(load_model(base), adapter), ids)
    assert relative_error(mesp.forward(load_model(tmp_path / "m.gguf"), ids), want) < 1e-5
    src, got = gguf.GGUFReader(str(base)).fields, gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    for key in ("llama.rope.freq_base", "llama.attention.head_count_kv", "tokenizer.ggml.eos_token_id"):
        if key in src:
            assert got[key].contents() == src[key].contents(), key
    assert got["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32


def run_cli(capsys, *args):
    capsys.readouterr()
    rc = main([*map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_bad_input_is_one_line_and_writes_nothing(make_hf_model, tmp_path, capsys):
    path, _ = make_hf_model("llama", **LLAMA)
    other, _ = make_hf_model("llama", hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    adapter, _ = saved_adapter(path, tmp_path)
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    for f in adapter.iterdir():
        (unknown / f.name).write_bytes(f.read_bytes())
    config = json.loads((unknown / "adapter_config.json").read_text())
    (unknown / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj", "wq"]}))
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    outdir = tmp_path / "out"
    outdir.mkdir()
    cases = [
        (["export", "--model", other, "--adapter", adapter, "--out", outdir / "a.gguf"], "has shape"),
        (["export", "--model", path, "--adapter", unknown, "--out", outdir / "a.gguf"], "unknown wq"),
        (["export", "--model", path, "--adapter", adapter, "--out", blocker / "a.gguf"], "cannot write"),
        (["merge", "--format", "gguf", "--model", other, "--adapter", adapter, "--out", outdir / "m.gguf"],
         "has shape"),
        (["merge", "--format", "gguf", "--model", path, "--adapter", adapter, "--out", blocker / "m.gguf"],
         "cannot write"),
    ]
    for args, message in cases:
        rc, out, err = run_cli(capsys, *args)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and message in lines[0], (args, err)
    assert not list(outdir.iterdir())
    rc, out, err = run_cli(capsys, "export", "--model", path, "--adapter", adapter, "--out", outdir / "a.gguf",
                           "--outtype", "q8_0")
    assert rc == 0 and "wrote" in out and "q8_0" in out, err
    rc, out, err = run_cli(capsys, "export", "--model", path, "--adapter", adapter, "--out", outdir / "a.gguf")
    assert rc == 2 and "already exists" in err
    rc, out, err = run_cli(capsys, "merge", "--format", "gguf", "--quantize", "q4_0", "--model", path, "--adapter",
                           adapter, "--out", outdir / "m.gguf")
    assert rc == 0 and "q4_0" in out, err
    assert sorted(p.name for p in outdir.iterdir()) == ["a.gguf", "m.gguf"] and not no_temporaries(outdir)


def test_interrupted_export_leaves_nothing(make_hf_model, tmp_path, monkeypatch):
    path, _ = make_hf_model("qwen2")
    adapter, _ = saved_adapter(path, tmp_path)
    calls = []

    def interrupt(data, qtype):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(data, qtype)

    real = gguf.quants.quantize
    monkeypatch.setattr(gguf.quants, "quantize", interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_gguf_lora(path, adapter, tmp_path / "out" / "a.gguf")
    assert not list((tmp_path / "out").iterdir())


def test_adapter_of_a_random_preset_exports_without_its_weights(tmp_path):
    """A preset's adapter is checked against the preset's shapes only: the base weights are never drawn."""
    from mesp.families import ModelConfig
    from mesp.model import Model
    from mesp.presets import PRESETS

    cfg = ModelConfig.from_hf(dict(PRESETS["qwen3-0.6b"]["config"]), where="preset")
    model = random_adapter(Model(cfg), targets=["q_proj", "k_proj"], r=2)
    mesp.save_adapter(model, tmp_path / "adapter")
    r = export_gguf_lora("qwen3-0.6b", tmp_path / "adapter", tmp_path / "a.gguf", outtype="f16")
    got = gguf_arrays(tmp_path / "a.gguf")
    assert r.lora_modules == 2 * cfg.num_hidden_layers and field(tmp_path / "a.gguf", "general.architecture") == "qwen3"
    tb, b = got["blk.3.attn_k.weight.lora_b"]
    assert tb == Q.F16 and b.shape == (cfg.num_key_value_heads * cfg.head_dim, 2)
    want = model.model.layers[3].self_attn.k_proj.lora_B.detach()  # Qwen: rows unpermuted
    assert relative_error(torch.from_numpy(b), want) < 1e-3
