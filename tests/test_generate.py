"""Generation: the KV-cache path equals no-cache greedy decoding (and transformers' greedy generate);
sampling is seeded; SmolLM2 answers the capital of France through `mesp generate --chat`."""

from __future__ import annotations

import pytest
import torch

import mesp
from mesp.cli import main
from mesp.errors import MespError
from mesp.generate import generate_batch_ids, generate_ids
from mesp.loaders import load_model


def greedy_no_cache(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0]
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("arch,overrides", [
    ("qwen2", dict(num_key_value_heads=2)),
    ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    ("qwen3", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),  # window < generated length
    ("smollm3", dict(no_rope_layer_interval=2)),
])
def test_kv_cache_greedy_equals_no_cache(make_hf_model, arch, overrides):
    path, hf_model = make_hf_model(arch, **overrides)
    model = load_model(path)
    prompt = [5, 17, 42, 9, 33]
    ours = list(generate_ids(model, prompt, max_new_tokens=12))
    assert ours == greedy_no_cache(model, prompt, 12)
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == ref[0, len(prompt):].tolist()


def test_sampling_is_seeded_and_stops(make_hf_model):
    path, _ = make_hf_model("qwen2", num_key_value_heads=2)
    model = load_model(path)
    prompt = [5, 17, 42]
    a = list(generate_ids(model, prompt, 20, temperature=1.5, seed=3))
    b = list(generate_ids(model, prompt, 20, temperature=1.5, seed=3))
    c = list(generate_ids(model, prompt, 20, temperature=1.5, seed=4))
    assert a == b and a != c and len(a) == 20
    # a tiny nucleus keeps only the top token: greedy
    assert list(generate_ids(model, prompt, 8, temperature=1.0, top_p=1e-6)) == list(generate_ids(model, prompt, 8))
    greedy = list(generate_ids(model, prompt, 8))
    stop = greedy[3]
    first = greedy.index(stop)
    assert list(generate_ids(model, prompt, 8, stop_ids={stop})) == greedy[:first + 1]
    assert list(generate_ids(model, prompt, 0)) == []
    with pytest.raises(MespError, match="top_p"):
        list(generate_ids(model, prompt, 4, top_p=1.5))


def test_smollm2_chat_cli_answers_paris(capsys, smollm2_model, smollm2_tokenizer):
    prompt = "What is the capital of France?"
    capsys.readouterr()
    rc = main(["generate", "--model", "smollm2-135m-instruct", "--chat", "--prompt", prompt,
               "--max-new-tokens", "16"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "Paris" in out.out
    # the library call (fixture-loaded model, cached tokenizer) gives the same text as the CLI's stream
    text = mesp.generate(smollm2_model, smollm2_tokenizer, prompt, chat=True, max_new_tokens=16)
    assert text.strip() == out.out.strip()
    assert mesp.load_tokenizer(smollm2_model) is smollm2_tokenizer  # cached


@pytest.mark.parametrize("arch,overrides", [
    ("qwen2", dict(num_key_value_heads=2)),
    ("qwen3", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),  # window < prompt + answer
    ("smollm3", dict(no_rope_layer_interval=2)),
])
def test_batched_greedy_equals_each_prompt_alone(make_hf_model, arch, overrides):
    """Left-padded prompts of different lengths decoded together give each prompt's own greedy tokens; a row
    that meets a stop id ends there while the others go on."""
    path, _ = make_hf_model(arch, **overrides)
    model = load_model(path)
    prompts = [[5, 17, 42, 9, 33], [7], [60, 2, 2, 81, 14, 3, 70, 11, 45], [33, 9]]
    alone = [list(generate_ids(model, p, max_new_tokens=10)) for p in prompts]
    assert generate_batch_ids(model, prompts, 10) == alone
    stop = alone[2][3]
    stopped = [a[:a.index(stop)] if stop in a else a for a in alone]
    assert generate_batch_ids(model, prompts, 10, stop_ids={stop}) == stopped
    assert generate_batch_ids(model, prompts, 0) == [[], [], [], []]
    assert generate_batch_ids(model, [], 5) == []
