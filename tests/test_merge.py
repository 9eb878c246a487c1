"""mesp merge: the merged HF directory gives the adapter model's logits, in mesp and in transformers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import mesp
from mesp.cli import main
from mesp.errors import MespError
from mesp.loaders import load_model
from mesp.merge import merge_adapter


def random_adapter(model, targets=None, r=4, alpha=8, seed=0, std=0.05):
    """LoRA with random non-zero A and B (a zero B would make the merge a no-op and the test blind)."""
    cfg = mesp.LoraConfig(r=r, alpha=alpha, **({"target_modules": targets} if targets else {}))
    mesp.add_lora(model, cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.lora_parameters().values():
            p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def adapter_and_reference(hf_dir, tmp_path, ids, **lora):
    """Save a random adapter for the model at hf_dir; return (adapter dir, logits with the adapter, without)."""
    model = load_model(hf_dir)
    base = mesp.forward(model, ids)
    random_adapter(model, **lora)
    adapter_dir = tmp_path / "adapter"
    mesp.save_adapter(model, adapter_dir)
    return adapter_dir, mesp.forward(model, ids), base


def transformers_logits(path, ids):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(input_ids=ids).logits


def ids_for(vocab, B=2, T=11, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch,overrides,targets", [
    ("llama", {}, None),
    ("qwen2", {}, ["q_proj", "v_proj", "down_proj"]),
    ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 1, "attention_bias": True}, ["k_proj", "o_proj"]),
])
def test_merged_logits_equal_adapter_logits(make_hf_model, tmp_path, arch, overrides, targets):
    path, _ = make_hf_model(arch, **overrides)
    ids = ids_for(96)
    adapter_dir, want, base = adapter_and_reference(path, tmp_path, ids, targets=targets)
    assert (want - base).abs().max() > 1e-2  # the adapter changes the output, so a dropped merge would show

    out = tmp_path / "merged"
    report = merge_adapter(path, adapter_dir, out)
    assert report.merged_modules == 2 * len(targets or mesp.lora.ALL_TARGETS)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # no tokenizer here
    torch.testing.assert_close(mesp.forward(load_model(out), ids), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(transformers_logits(out, ids), want, atol=1e-4, rtol=1e-4)


def test_untargeted_weights_are_copied_exactly(make_hf_model, tmp_path):
    path, hf_model = make_hf_model("qwen2")
    adapter_dir, _, _ = adapter_and_reference(path, tmp_path, ids_for(96), targets=["v_proj"])
    merge_adapter(path, adapter_dir, tmp_path / "merged")
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    source = hf_model.state_dict()
    assert set(merged) == set(source)
    for name, t in merged.items():
        if "v_proj.weight" in name:
            assert not torch.equal(t, source[name])
        else:
            assert torch.equal(t, source[name]), name


def test_sharded_output_loads_in_transformers(make_hf_model, tmp_path):
    path, _ = make_hf_model("llama")
    ids = ids_for(96, seed=1)
    adapter_dir, want, _ = adapter_and_reference(path, tmp_path, ids)
    out = tmp_path / "merged"
    report = merge_adapter(path, adapter_dir, out, max_shard_bytes=40_000)
    assert len(report.shards) > 2 and report.shards[0] == f"model-00001-of-{len(report.shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(report.shards)
    assert index["metadata"]["total_size"] == report.total_bytes
    torch.testing.assert_close(transformers_logits(out, ids), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mesp.forward(load_model(out), ids), want, atol=1e-4, rtol=1e-4)


def test_bfloat16_output_is_the_fp32_merge_rounded_once(make_hf_model, tmp_path):
    path, _ = make_hf_model("llama")
    adapter_dir, _, _ = adapter_and_reference(path, tmp_path, ids_for(96))
    merge_adapter(path, adapter_dir, tmp_path / "fp32")
    merge_adapter(path, adapter_dir, tmp_path / "bf16", dtype="bfloat16")
    fp32 = load_file(str(tmp_path / "fp32" / "model.safetensors"))
    bf16 = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    for name, t in bf16.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, fp32[name].to(torch.bfloat16)), name
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_refuses_to_overwrite_and_leaves_nothing_behind(make_hf_model, tmp_path):
    path, _ = make_hf_model("llama")
    adapter_dir, _, _ = adapter_and_reference(path, tmp_path, ids_for(96))
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(MespError, match="not empty.*--overwrite"):
        merge_adapter(path, adapter_dir, out)
    assert (out / "keep.txt").read_text() == "precious"
    with pytest.raises(MespError, match="an input of this merge"):
        merge_adapter(path, adapter_dir, path, overwrite=True)

    merge_adapter(path, adapter_dir, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()

    # an adapter that does not fit the model fails before anything is written
    (adapter_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                                  "target_modules": ["q_proj", "nope"]}))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(MespError, match="nope"):
        merge_adapter(path, adapter_dir, tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp dir, no half-written model


def test_cli_merge(make_hf_model, tmp_path, capsys):
    path, _ = make_hf_model("qwen2")
    adapter_dir, want, _ = adapter_and_reference(path, tmp_path, ids_for(96))
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(path), "--adapter", str(adapter_dir), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    torch.testing.assert_close(mesp.forward(load_model(out), ids_for(96)), want, atol=1e-4, rtol=1e-4)
    assert main(["merge", "--model", str(path), "--adapter", str(adapter_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mesp merge: error:") and "--overwrite" in err and len(err.strip().splitlines()) == 1


def test_merge_shipped_smollm2(smollm2_model, tmp_path):
    """The real GGUF (tied embeddings, tokenizer): its Q4_1 matrices, kept quantized by the merge and dequantized
    one by one, give the logits of the dense-loaded adapter model, in mesp and in transformers."""
    from transformers import AutoTokenizer

    model = load_model("smollm2-135m-instruct")
    random_adapter(model, r=4, alpha=8, std=0.02)
    adapter_dir = tmp_path / "adapter"
    mesp.save_adapter(model, adapter_dir)
    tok = mesp.load_tokenizer(model)
    ids = torch.tensor([tok("The capital of France is Paris, and")["input_ids"]])
    want = mesp.forward(model, ids)
    assert (want - mesp.forward(smollm2_model, ids)).abs().max() > 0.1
    del model

    out = tmp_path / "merged"
    report = merge_adapter("smollm2-135m-instruct", adapter_dir, out)
    assert report.tokenizer and report.merged_modules == 30 * 7
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok("The capital of France is Paris, and")["input_ids"] == ids[0].tolist()
    torch.testing.assert_close(mesp.forward(load_model(out), ids), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(transformers_logits(out, ids), want, atol=1e-4, rtol=1e-4)


def test_never_replaces_a_directory_holding_an_input(make_hf_model, tmp_path):
    """--out --overwrite on a parent of the base model or of the adapter would delete them with the old output."""
    models = tmp_path / "models"
    models.mkdir()
    path, _ = make_hf_model("llama")
    base = models / "base"
    shutil.copytree(path, base)
    adapter_dir, _, _ = adapter_and_reference(base, models, ids_for(96))
    before = sorted(p.relative_to(tmp_path) for p in models.rglob("*"))
    for out in (models, tmp_path):
        with pytest.raises(MespError, match="an input of this merge"):
            merge_adapter(base, adapter_dir, out, overwrite=True)
    assert sorted(p.relative_to(tmp_path) for p in models.rglob("*")) == before


def test_a_file_written_into_out_during_the_merge_is_kept(make_hf_model, tmp_path, monkeypatch):
    """--out was empty when the merge began; something written there meanwhile is not deleted without --overwrite."""
    path, _ = make_hf_model("llama")
    adapter_dir, _, _ = adapter_and_reference(path, tmp_path, ids_for(96))
    out = tmp_path / "merged"
    out.mkdir()
    real = mesp.merge.merged_weights

    def meanwhile(*a, **k):
        (out / "notes.txt").write_text("written while merging")
        yield from real(*a, **k)
    monkeypatch.setattr(mesp.merge, "merged_weights", meanwhile)
    with pytest.raises(MespError, match="not empty"):
        merge_adapter(path, adapter_dir, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"]


def test_written_files_respect_the_umask(make_hf_model, tmp_path):
    """mkstemp/mkdtemp create 0600/0700; what mesp writes must carry the user's umask like any other tool's output,
    and a replaced --out keeps the mode the user gave it."""
    import os
    import stat

    path, _ = make_hf_model("qwen2")
    old = os.umask(0o022)
    try:
        adapter_dir, _, _ = adapter_and_reference(path, tmp_path, ids_for(96))
        for f in adapter_dir.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
        out = tmp_path / "merged"
        merge_adapter(path, adapter_dir, out)
        assert stat.S_IMODE(out.stat().st_mode) == 0o755
        assert all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in out.iterdir())
        os.chmod(out, 0o750)
        merge_adapter(path, adapter_dir, out, overwrite=True)
        assert stat.S_IMODE(out.stat().st_mode) == 0o750
        os.umask(0o077)
        merge_adapter(path, adapter_dir, tmp_path / "private")
        assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o700
        assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in (tmp_path / "private").iterdir())
    finally:
        os.umask(old)
