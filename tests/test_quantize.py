"""mesp quantize / mesp.quantize_model: any source to a GGUF file that loads back as the source with its matrices
quantized (checked against gguf.quants' own quantize + dequantize of the source weights), llama.cpp's names and
q/k order, F32 where blocks do not fit, atomic output, one-line CLI errors."""

from __future__ import annotations

import os

import gguf
import numpy as np
import pytest
import torch
from helpers import write_gguf
from test_loaders import LLAMA3_ROPE

import mesp
from mesp.cli import main
from mesp.errors import MespError
from mesp.families import expected_shapes
from mesp.formats.gguf import gguf_to_hf_name, unpermute
from mesp.formats import gguf_writer
from mesp.formats.gguf_writer import hf_to_gguf_name, permute
from mesp.model import set_weight
from mesp.presets import PRESETS

Q = gguf.GGMLQuantizationType


@pytest.fixture(autouse=True)
def small_row_blocks(monkeypatch):
    """Blocks of 16-32 rows, so every tiny matrix is written in several blocks (as real ones are): a block
    boundary that broke a q/k permutation or a seeded draw would show."""
    monkeypatch.setattr(gguf_writer, "CHUNK_VALUES", 1024)


def dense(w) -> torch.Tensor:
    """A model weight as a dense tensor, whatever form the loader gave it."""
    return w if isinstance(w, torch.Tensor) else w.dequantize()


def quantized_reference(source, to: str) -> mesp.Model:
    """`source` loaded dense, every matrix whose columns split into 32-blocks replaced by gguf.quants'
    quantize-then-dequantize of it: what the quantized file must load as."""
    model = mesp.load_model(source)
    for name, shape in expected_shapes(model.config).items():
        if len(shape) == 2 and shape[1] % 32 == 0:
            w = dense(model.get_submodule(name.rsplit(".", 1)[0]).weight).numpy()
            back = gguf.quants.dequantize(gguf.quants.quantize(w, Q[to.upper()]), Q[to.upper()])
            set_weight(model, name, torch.from_numpy(np.array(back, dtype=np.float32)))
    return model


def assert_same_model(got: mesp.Model, want: mesp.Model):
    for name in expected_shapes(want.config):
        module = name.rsplit(".", 1)[0]
        a = dense(got.get_submodule(module).weight if name.endswith(".weight") else got.get_submodule(module).bias)
        b = dense(want.get_submodule(module).weight if name.endswith(".weight") else want.get_submodule(module).bias)
        assert torch.equal(a, b), name  # bit for bit: a permutation or block bug cannot hide in the logits
    ids = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4]]) % want.config.vocab_size
    with torch.no_grad():
        assert torch.allclose(got(ids)[0], want(ids)[0], rtol=1e-5, atol=1e-5)


def tensor_types(path) -> dict[str, Q]:
    return {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("arch,overrides,to", [
    ("llama", dict(num_key_value_heads=2), "q4_0"),
    ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True, head_dim=32), "q8_0"),
    ("qwen2", dict(num_key_value_heads=2), "q4_1"),
    ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True), "q4_0"),
    ("llama", dict(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE), "q4_0"),
])
def test_hf_directory_loads_back_as_its_quantized_self(make_hf_model, tmp_path, arch, overrides, to):
    path, _ = make_hf_model(arch, **overrides)
    out = tmp_path / f"{arch}.{to}.gguf"
    r = mesp.quantize_model(path, to, out)
    types = tensor_types(out)
    matrices = sum(len(s) == 2 for s in expected_shapes(mesp.load_model(path).config).values())
    assert r.bytes == os.path.getsize(out) and r.tensors == len(types)
    assert r.quantized == matrices == sum(t == Q[to.upper()] for t in types.values())  # every matrix: 32 | cols
    assert ("rope_freqs.weight" in types) == ("rope_parameters" in overrides)
    assert types["blk.0.attn_q.weight"] == Q[to.upper()] and types["blk.0.attn_norm.weight"] == Q.F32
    assert ("output.weight" in types) != bool(overrides.get("tie_word_embeddings"))
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.file_type"].contents() == int(
        {"q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[to])
    got, want = mesp.load_model(out), quantized_reference(path, to)
    scaling = {k: v for k, v in (want.config.rope_scaling or {}).items() if k != "rope_theta"}
    assert (got.config.rope_scaling or {}) == scaling  # rope_theta has its own key
    assert_same_model(got, want)


def test_sharded_directory(make_hf_model, tmp_path):
    path, _ = make_hf_model("qwen2", max_shard_size="20KB", num_key_value_heads=2)
    assert len(list(path.glob("*.safetensors"))) > 1
    mesp.quantize_model(path, "q8_0", tmp_path / "s.gguf")
    assert_same_model(mesp.load_model(tmp_path / "s.gguf"), quantized_reference(path, "q8_0"))
    with pytest.raises(MespError, match="is an input"):
        mesp.quantize_model(path, "q8_0", path / "model.safetensors.index.json", overwrite=True)


def test_matrix_whose_columns_do_not_split_into_blocks_stays_f32(make_hf_model, tmp_path):
    path, _ = make_hf_model("qwen2", num_key_value_heads=2, intermediate_size=80)
    out = tmp_path / "odd.gguf"
    mesp.quantize_model(path, "q4_0", out)
    types = tensor_types(out)
    assert types["blk.1.ffn_down.weight"] == Q.F32  # [64, 80]: 80 columns are not whole 32-blocks
    assert types["blk.1.ffn_up.weight"] == Q.Q4_0  # [80, 64]
    assert_same_model(mesp.load_model(out), quantized_reference(path, "q4_0"))


def test_gguf_source_is_requantized_with_its_metadata(make_hf_model, tmp_path):
    _, hf_model = make_hf_model("llama", num_key_value_heads=2)
    src = tmp_path / "src.gguf"
    write_gguf(src, hf_model, [Q.F16, Q.Q8_0, Q.F32])  # llama.cpp's layout, written without mesp
    out = tmp_path / "re.gguf"
    mesp.quantize_model(src, "q4_1", out)
    assert_same_model(mesp.load_model(out), quantized_reference(src, "q4_1"))
    a, b = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(out))
    assert b.fields["tokenizer.ggml.tokens"].contents() == a.fields["tokenizer.ggml.tokens"].contents()
    assert b.fields["llama.rope.freq_base"].contents() == a.fields["llama.rope.freq_base"].contents()
    assert [t.name for t in b.tensors] == [t.name for t in a.tensors]
    again = tmp_path / "again.gguf"  # same type again: the blocks come back unchanged
    mesp.quantize_model(out, "q4_1", again)
    c = gguf.GGUFReader(str(again))
    assert all(np.array_equal(x.data, y.data) for x, y in zip(b.tensors, c.tensors))


def test_shipped_gguf_requantized_keeps_its_tokenizer(smollm2_gguf, tmp_path):
    out = tmp_path / "smol.q8_0.gguf"
    mesp.quantize_model("smollm2-135m-instruct", "q8_0", out)
    a, b = mesp.load_tokenizer(smollm2_gguf), mesp.load_tokenizer(out)
    text = "What is the capital of France?"
    assert a.encode(text) == b.encode(text) and len(a) == len(b)
    assert set(tensor_types(out).values()) == {Q.Q8_0, Q.F32}


def test_random_preset_is_drawn_as_load_model_draws_it(monkeypatch, tmp_path):
    from helpers import hf_config

    cfg = hf_config("qwen2", num_key_value_heads=2, tie_word_embeddings=True, intermediate_size=160).to_dict()
    monkeypatch.setitem(PRESETS, "tiny-random", {"kind": "random", "config": cfg, "description": "test"})
    out = tmp_path / "tiny.gguf"
    mesp.quantize_model("tiny-random", "q4_0", out)
    assert_same_model(mesp.load_model(out), quantized_reference("tiny-random", "q4_0"))


def test_name_map_and_permutation_invert_the_reader():
    for name in ("model.layers.7.self_attn.k_proj.bias", "model.layers.0.mlp.down_proj.weight", "lm_head.weight",
                 "model.embed_tokens.weight", "model.norm.weight", "model.layers.3.post_attention_layernorm.weight"):
        assert gguf_to_hf_name(hf_to_gguf_name(name)) == name
    with pytest.raises(MespError, match="no llama.cpp name"):
        hf_to_gguf_name("model.layers.0.mlp.experts.weight")
    w = torch.arange(4 * 16 * 3, dtype=torch.float32).reshape(64, 3)
    p = torch.from_numpy(permute(w.numpy(), 4))
    assert not torch.equal(p, w) and torch.equal(unpermute(p, 4), w)


def _no_temporaries(directory):
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")] == []


def test_overwrite_semantics(make_hf_model, tmp_path):
    path, _ = make_hf_model("qwen2", num_key_value_heads=2)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(MespError, match="already exists"):
        mesp.quantize_model(path, "q8_0", out)
    assert out.read_bytes() == b"keep me"
    mesp.quantize_model(path, "q8_0", out, overwrite=True)
    assert tensor_types(out)["token_embd.weight"] == Q.Q8_0
    with pytest.raises(MespError, match="is an input"):
        mesp.quantize_model(out, "q4_0", out, overwrite=True)  # never over its own input
    assert tensor_types(out)["token_embd.weight"] == Q.Q8_0
    assert _no_temporaries(tmp_path)


def test_interrupted_write_leaves_nothing(make_hf_model, tmp_path, monkeypatch):
    path, _ = make_hf_model("qwen2", num_key_value_heads=2)
    calls = []
    real = gguf.quants.quantize

    def interrupted(data, qtype):
        calls.append(qtype)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(data, qtype)

    monkeypatch.setattr(gguf.quants, "quantize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        mesp.quantize_model(path, "q4_0", tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def run_quantize_cli(capsys, *args):
    capsys.readouterr()
    rc = main(["quantize", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli(make_hf_model, tmp_path, capsys):
    path, _ = make_hf_model("qwen2", num_key_value_heads=2)
    rc, out, err = run_quantize_cli(capsys, path, "--to", "q4_0", "--out", tmp_path / "a.gguf")
    assert rc == 0 and "wrote" in out and "q4_0" in out, err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for args, message in [
        (("--to", "q5_k", "--out", tmp_path / "b.gguf"), "unknown quantization 'q5_k'"),
        (("--to", "q4_0", "--out", blocker / "c.gguf"), "cannot write"),
        (("--to", "q4_0", "--out", tmp_path / "a.gguf"), "already exists"),
    ]:
        rc, out, err = run_quantize_cli(capsys, path, *args)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    rc, out, err = run_quantize_cli(capsys, tmp_path / "nothing", "--to", "q4_0", "--out", tmp_path / "d.gguf")
    assert rc == 2 and "no such file" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "file"]
