"""LoRA in PEFT's conventions: add_lora's initialisation and layout against PEFT's own, and adapters moving
both ways between mesp and PEFT with the same logits."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import mesp
from mesp.lora import ALL_TARGETS, adapter_state

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


ARCHS = {"qwen2": dict(num_key_value_heads=2), "llama": dict(num_key_value_heads=1, tie_word_embeddings=True)}


def fresh_hf(path):
    """A new transformers model from `path` (PEFT injects its layers in place: never reuse the cached one)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def peft_model(path, r, alpha, targets):
    import peft

    return peft.get_peft_model(fresh_hf(path), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                               lora_dropout=0.0))


def randomize(tensors, seed=0):
    """Random A and non-zero B, so a wrong scale, transpose or key shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tensors:
            t.copy_(0.2 * torch.randn(t.shape, generator=g))


def batch(vocab=96):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding: real positions' logits do not depend on the pad convention
    return ids, mask


def assert_logits_close(ours, theirs, mask, tol=1e-4):
    real = mask.bool()
    diff = (ours[real] - theirs[real]).abs().max().item()
    assert diff <= tol, f"logits differ by {diff:.2e}"


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("targets", [list(ALL_TARGETS), ["q_proj", "v_proj"], ["up_proj", "o_proj", "k_proj"]])
def test_add_lora_layout_and_init_match_peft(make_hf_model, arch, targets):
    import peft

    path, hf = make_hf_model(arch, **ARCHS[arch])
    r, alpha = 4, 12
    model = mesp.load_model(path)
    ids, mask = batch()
    base_logits = mesp.forward(model, ids, mask)
    mesp.add_lora(model, mesp.LoraConfig(r=r, alpha=alpha, target_modules=targets), seed=3)
    ours = adapter_state(model)
    pm = peft_model(path, r, alpha, targets)

    saved = peft.get_peft_model_state_dict(pm)  # what PEFT writes to adapter_model.safetensors
    assert list(ours) == list(saved), "key names (and order) differ from PEFT's"
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in saved.items()}
    in_memory = {k.replace(".default.weight", ".weight") for k in pm.state_dict() if ".lora_" in k}
    assert in_memory == set(ours)

    for key, t in ours.items():
        their = saved[key]
        if ".lora_B." in key:
            assert torch.count_nonzero(t) == 0 and torch.count_nonzero(their) == 0, key
            continue
        bound = 1 / math.sqrt(t.shape[1])  # kaiming_uniform(a=sqrt(5)) on [r, in]
        assert t.abs().max() <= bound and their.abs().max() <= bound, key
        assert t.abs().max() > 0.8 * bound, f"{key}: does not span PEFT's range"
        assert abs(t.std().item() / (bound / math.sqrt(3)) - 1) < 0.15, f"{key}: not uniform on +-bound"
    for name, proj in model.named_modules():
        if isinstance(proj, mesp.model.Linear) and proj.has_lora:
            their_scale = pm.get_submodule(f"base_model.model.{name}").scaling["default"]
            assert proj.scale == alpha / r == their_scale, name
    # B = 0: the adapted model is the base model
    assert torch.equal(mesp.forward(model, ids, mask), base_logits)


def test_add_lora_seeding_and_replacement(make_hf_model):
    path, _ = make_hf_model("qwen2", **ARCHS["qwen2"])
    a = adapter_state(mesp.add_lora(mesp.load_model(path), mesp.LoraConfig(r=2), seed=5))
    b = adapter_state(mesp.add_lora(mesp.load_model(path), mesp.LoraConfig(r=2), seed=5))
    c = adapter_state(mesp.add_lora(mesp.load_model(path), mesp.LoraConfig(r=2), seed=6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[next(iter(a))], c[next(iter(a))])
    model = mesp.add_lora(mesp.load_model(path), mesp.LoraConfig(r=2))
    mesp.add_lora(model, mesp.LoraConfig(r=3, target_modules=["v_proj"]))
    keys = set(adapter_state(model))
    assert keys and all(".v_proj.lora_" in k for k in keys), sorted(keys)[:3]
    assert all(p.shape[0] == 3 or p.shape[1] == 3 for p in adapter_state(model).values())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_saved_adapter_loads_in_peft_with_equal_logits(make_hf_model, tmp_path, arch):
    from peft import PeftModel

    path, _ = make_hf_model(arch, **ARCHS[arch])
    model = mesp.add_lora(mesp.load_model(path), mesp.LoraConfig(r=4, alpha=12, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]))
    randomize(model.lora_parameters().values())
    mesp.save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    on_disk = load_file(str(tmp_path / "adapter_model.safetensors"))
    ours = adapter_state(model)
    assert set(on_disk) == set(ours) and all(torch.equal(on_disk[k], ours[k]) for k in ours)

    pm = PeftModel.from_pretrained(fresh_hf(path), str(tmp_path)).eval()
    cfg = pm.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, set(cfg.target_modules)) == (4, 12, {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                          "down_proj"})
    ids, mask = batch()
    with torch.no_grad():
        theirs = pm(input_ids=ids, attention_mask=mask).logits
        base = fresh_hf(path)(input_ids=ids, attention_mask=mask).logits
    ours_logits = mesp.forward(model, ids, mask)
    assert_logits_close(ours_logits, theirs, mask)
    assert (ours_logits - base).abs().max() > 1e-2, "the adapter does not change the logits: vacuous check"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_peft_saved_adapter_loads_in_ours_with_equal_logits(make_hf_model, tmp_path, arch):
    path, _ = make_hf_model(arch, **ARCHS[arch])
    pm = peft_model(path, 2, 5, ["q_proj", "k_proj", "gate_proj", "up_proj"]).eval()
    randomize([p for n, p in pm.named_parameters() if ".lora_" in n], seed=2)
    pm.save_pretrained(str(tmp_path))
    model = mesp.load_adapter(mesp.load_model(path), tmp_path)
    cfg = model.lora_config
    assert (cfg.r, cfg.alpha, set(cfg.target_modules)) == (2, 5, {"q_proj", "k_proj", "gate_proj", "up_proj"})
    ids, mask = batch()
    with torch.no_grad():
        theirs = pm(input_ids=ids, attention_mask=mask).logits
    assert_logits_close(mesp.forward(model, ids, mask), theirs, mask)

    # and ours -> ours is lossless
    mesp.save_adapter(model, tmp_path / "again")
    again = mesp.load_adapter(mesp.load_model(path), tmp_path / "again")
    first, second = adapter_state(model), adapter_state(again)
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)


# ----------------------------------------------------------------------------- bad adapters


def _drop_tensor(d):
    t = load_file(str(d / "adapter_model.safetensors"))
    t.pop(sorted(t)[0])
    save_file(t, str(d / "adapter_model.safetensors"))


def _reshape_tensor(d):
    t = load_file(str(d / "adapter_model.safetensors"))
    k = sorted(t)[0]
    t[k] = torch.zeros(t[k].shape[0] + 1, t[k].shape[1])
    save_file(t, str(d / "adapter_model.safetensors"))


def _extra_tensor(d):
    t = load_file(str(d / "adapter_model.safetensors"))
    t["base_model.model.lm_head.lora_A.weight"] = torch.zeros(2, 64)
    save_file(t, str(d / "adapter_model.safetensors"))


def _edit_config(**changes):
    def edit(d):
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(changes)
        for k in [k for k, v in changes.items() if v is None]:
            cfg.pop(k)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    return edit


BAD = {
    "no config": (lambda d: (d / "adapter_config.json").unlink(), "adapter_config.json", "not found"),
    "no weights": (lambda d: (d / "adapter_model.safetensors").unlink(), "adapter_model.safetensors", "not found"),
    "bad json": (lambda d: (d / "adapter_config.json").write_text('{"r": 2,'), "adapter_config.json",
                 "invalid JSON"),
    "corrupt weights": (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}"),
                        "adapter_model.safetensors", "unreadable"),
    "missing tensor": (_drop_tensor, "adapter_model.safetensors", "missing tensor"),
    "wrong shape": (_reshape_tensor, "adapter_model.safetensors", "has shape"),
    "unexpected tensor": (_extra_tensor, "adapter_model.safetensors", "unexpected tensor"),
    "dora": (_edit_config(use_dora=True), "adapter_config.json", "use_dora"),
    "not lora": (_edit_config(peft_type="IA3"), "adapter_config.json", "not LORA"),
    "no rank": (_edit_config(r=None), "adapter_config.json", "'r'"),
    "unknown target": (_edit_config(target_modules=["q_proj", "lm_head"]), "adapter_config.json", "lm_head"),
    # sizes checked against the tensors before anything is allocated
    "huge rank": (_edit_config(r=10**6), "adapter_config.json", "r = 1000000"),
    "rank disagrees": (_edit_config(r=3), "adapter_config.json", "r = 3"),
    # scale factors that would silently give NaN or a wrong model
    "alpha nan": (_edit_config(lora_alpha=float("nan")), "adapter_config.json", "lora_alpha"),
    "alpha inf": (_edit_config(lora_alpha=float("inf")), "adapter_config.json", "lora_alpha"),
    "alpha zero": (_edit_config(lora_alpha=0), "adapter_config.json", "lora_alpha"),
    "alpha negative": (_edit_config(lora_alpha=-16), "adapter_config.json", "lora_alpha"),
    "alpha string": (_edit_config(lora_alpha="16"), "adapter_config.json", "lora_alpha"),
    # wrong types
    "rank string": (_edit_config(r="8"), "adapter_config.json", "r:"),
    "targets number": (_edit_config(target_modules=5), "adapter_config.json", "target_modules"),
    "targets numbers": (_edit_config(target_modules=[1, 2]), "adapter_config.json", "target_modules"),
    "dropout string": (_edit_config(lora_dropout="0.1"), "adapter_config.json", "lora_dropout"),
    "not an object": (lambda d: (d / "adapter_config.json").write_text("[2]"), "adapter_config.json",
                      "not a JSON object"),
    # fields mesp does not implement, set to something other than PEFT's default
    "layers_to_transform": (_edit_config(layers_to_transform=[0]), "adapter_config.json", "layers_to_transform"),
    "layers_pattern": (_edit_config(layers_pattern="layers"), "adapter_config.json", "layers_pattern"),
    "modules_to_save": (_edit_config(modules_to_save=["lm_head"]), "adapter_config.json", "modules_to_save"),
    "bias": (_edit_config(bias="lora_only"), "adapter_config.json", "bias"),
    "fan_in_fan_out": (_edit_config(fan_in_fan_out=True), "adapter_config.json", "fan_in_fan_out"),
    "rslora": (_edit_config(use_rslora=True), "adapter_config.json", "use_rslora"),
    "rank_pattern": (_edit_config(rank_pattern={"q_proj": 4}), "adapter_config.json", "rank_pattern"),
    "alpha_pattern": (_edit_config(alpha_pattern={"q_proj": 4}), "adapter_config.json", "alpha_pattern"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapter_raises_mesp_error_naming_the_file(make_hf_model, tmp_path, case):
    break_it, filename, words = BAD[case]
    path, _ = make_hf_model("qwen2", **ARCHS["qwen2"])
    model = mesp.add_lora(mesp.load_model(path), mesp.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    mesp.save_adapter(model, tmp_path)
    mesp.load_adapter(mesp.load_model(path), tmp_path)  # intact, it loads
    break_it(tmp_path)
    with pytest.raises(mesp.MespError) as err:
        mesp.load_adapter(mesp.load_model(path), tmp_path)
    msg = str(err.value)
    assert str(tmp_path / filename) in msg and words in msg and "\n" not in msg, msg


def test_huge_rank_in_adapter_config_fails_fast_without_allocating(make_hf_model, tmp_path):
    """r = 10**6 would allocate gigabytes of LoRA matrices were it trusted before the tensors are looked at."""
    path, _ = make_hf_model("qwen2", **ARCHS["qwen2"])
    model = mesp.add_lora(mesp.load_model(path), mesp.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    mesp.save_adapter(model, tmp_path)
    _edit_config(r=10**9)(tmp_path)
    fresh = mesp.load_model(path)
    start = time.perf_counter()
    with pytest.raises(mesp.MespError, match=r"adapter_config.json: r = 1000000000"):
        mesp.load_adapter(fresh, tmp_path)
    assert time.perf_counter() - start < 2.0
    assert not fresh.lora_parameters(), "LoRA matrices were allocated before the error"


@pytest.mark.parametrize("unset", [{}, dict(bias="none", fan_in_fan_out=False, layers_to_transform=None,
                                            layers_pattern=[], modules_to_save=[], rank_pattern={},
                                            alpha_pattern={}, use_dora=False, use_rslora=False, lora_dropout=0.05)])
def test_adapter_config_defaults_of_unimplemented_fields_load(make_hf_model, tmp_path, unset):
    """PEFT writes every field out with its default (or omits it, in older versions): those adapters load."""
    path, _ = make_hf_model("qwen2", **ARCHS["qwen2"])
    model = mesp.add_lora(mesp.load_model(path), mesp.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    mesp.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if k in ("peft_type", "r", "lora_alpha", "target_modules")} | unset
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    loaded = mesp.load_adapter(mesp.load_model(path), tmp_path)
    assert set(adapter_state(loaded)) == set(adapter_state(model))


@pytest.mark.parametrize("r", [65, 10**6])
def test_rank_above_the_model_dimensions_is_refused_before_allocation(make_hf_model, r):
    path, _ = make_hf_model("qwen2", **ARCHS["qwen2"])
    model = mesp.load_model(path)
    smallest = min(min(m.in_features, m.out_features) for m in model.model.layers[0].projections().values())
    r = max(r, smallest + 1)
    start = time.perf_counter()
    with pytest.raises(mesp.MespError, match=rf"^r: LoRA rank {r} exceeds the dimensions of model\.layers"):
        mesp.add_lora(model, mesp.LoraConfig(r=r))
    assert time.perf_counter() - start < 2.0 and not model.lora_parameters()
    mesp.add_lora(model, mesp.LoraConfig(r=smallest, target_modules=["q_proj"]))  # up to full rank is fine


def test_missing_adapter_directory(make_hf_model, tmp_path):
    path, _ = make_hf_model("qwen2", **ARCHS["qwen2"])
    with pytest.raises(mesp.MespError, match="adapter_config.json: not found"):
        mesp.load_adapter(mesp.load_model(path), tmp_path / "nowhere")


def test_save_without_lora_raises(make_hf_model, tmp_path):
    path, _ = make_hf_model("qwen2", **ARCHS["qwen2"])
    with pytest.raises(mesp.MespError, match="no LoRA adapter"):
        mesp.save_adapter(mesp.load_model(path), tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("kwargs,words", [
    (dict(target_modules=["q_proj", "qkv_proj"]), "unknown qkv_proj"),
    (dict(target_modules=[]), "target_modules"),
    (dict(r=0), "r: must be a positive integer"),
    (dict(r=2.5), "r: must be a positive integer"),
    (dict(dropout=1.0), "dropout"),
])
def test_bad_lora_config(kwargs, words):
    with pytest.raises(mesp.MespError, match=words):
        mesp.LoraConfig(**kwargs)


def test_lora_config_accepts_comma_separated_targets():
    cfg = mesp.LoraConfig(r=4, alpha=8, target_modules="q_proj, v_proj")
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.scale == 2.0
