"""mesp's GGUF exports in the real client: llama.cpp through llama-cpp-python (`pip install -e '.[llamacpp]'`;
`scripts/dev.sh interop` installs it and runs this module). Skipped when llama_cpp is not importable.

The demo adapter is trained on the shipped SmolLM2 (Q4_1) with the demo's settings and exported; llama.cpp
loads the shipped GGUF with it and answers held-out demo questions, greedy, with the trained facts; its
logits for one prompt are compared with mesp's own; the merged Q8_0 GGUF answers the same. The measured
numbers are printed (run with -s to see them).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import mesp
from mesp.demo import DemoSettings, contains_answer, load_heldout, train_config
from mesp.export import export_gguf_lora, merge_gguf
from mesp.generate import generate
from mesp.presets import preset_gguf_path
from mesp.tokenizer import encode_prompt
from mesp.train import train

llama_cpp = pytest.importorskip("llama_cpp")

MODEL = "smollm2-135m-instruct"
N_CTX = 256
MAX_TOKENS = 16  # the demo's answer length
QUESTIONS = 6  # held-out questions asked (the first ones; each fact is asked twice in the file)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, smollm2_gguf):
    """(adapter directory, exported LoRA GGUF, seconds taken), the demo adapter trained once."""
    started = time.perf_counter()
    out = tmp_path_factory.mktemp("interop")
    train(train_config(DemoSettings(), out / "adapter"))
    export_gguf_lora(MODEL, out / "adapter", out / "adapter.gguf")
    return out / "adapter", out / "adapter.gguf", time.perf_counter() - started


def llama(model_path, lora_path=None):
    kw = {"lora_path": str(lora_path)} if lora_path else {}
    return llama_cpp.Llama(model_path=str(model_path), n_ctx=N_CTX, n_threads=2, seed=0, logits_all=True,
                           verbose=False, **kw)


def answers(llm, questions) -> list[str]:
    """Greedy chat answers, through the chat template the GGUF carries (as llama-cli -cnv uses it)."""
    out = []
    for q in questions:
        r = llm.create_chat_completion(messages=[{"role": "user", "content": q}], temperature=0.0, top_k=1,
                                       max_tokens=MAX_TOKENS)
        out.append(r["choices"][0]["message"]["content"].strip())
    return out


def score(texts, heldout) -> int:
    return sum(contains_answer(t, a.expected) for t, a in zip(texts, heldout))


def test_llama_cpp_runs_the_exported_adapter(trained, smollm2_gguf):
    adapter_dir, adapter_gguf, train_seconds = trained
    heldout = load_heldout(DemoSettings().heldout_file)[:QUESTIONS]
    questions = [a.question for a in heldout]
    started = time.perf_counter()
    base = preset_gguf_path(MODEL)

    llm = llama(base)
    before = score(answers(llm, questions), heldout)
    del llm
    llm = llama(base, adapter_gguf)
    texts = answers(llm, questions)
    after = score(texts, heldout)
    print(f"\nllama.cpp, shipped Q4_1 SmolLM2: {before}/{len(heldout)} held-out answers correct without the "
          f"adapter, {after}/{len(heldout)} with it")
    for a, t in zip(heldout, texts):
        print(f"  {a.question!r} -> {t!r} (expected {a.expected})")
    assert after >= len(heldout) - 1 and after > before

    # one prompt's next-token logits, same token ids in both (mesp's tokenizer and chat template)
    model = mesp.load_adapter(mesp.load_model(MODEL), adapter_dir)
    tokenizer = mesp.load_tokenizer(model)
    ids = encode_prompt(tokenizer, questions[0], chat=True)
    with torch.no_grad():
        ours = mesp.forward(model, torch.tensor([ids]))[0, -1].double().numpy()
    llm.reset()
    llm.eval(ids)
    theirs = np.asarray(llm.scores[len(ids) - 1], dtype=np.float64)
    rel = np.linalg.norm(theirs - ours) / np.linalg.norm(ours)
    top = np.argsort(-ours)[:5]
    print(f"next-token logits for {len(ids)} prompt tokens: relative difference {rel:.2e}, max |diff| "
          f"{np.abs(theirs - ours).max():.3f} (logits up to {np.abs(ours).max():.1f}); top-5 tokens mesp "
          f"{top.tolist()}, llama.cpp {np.argsort(-theirs)[:5].tolist()}")
    # llama.cpp multiplies Q4_1 weights by activations it rounds to 8 bits (Q8_1), mesp in fp32: close, not equal
    assert rel < 0.05 and int(np.argmax(theirs)) == int(top[0])
    del llm
    ours_texts = [generate(model, tokenizer, q, chat=True, max_new_tokens=MAX_TOKENS).strip() for q in questions]
    print(f"mesp (same adapter and base): {score(ours_texts, heldout)}/{len(heldout)} correct; llama.cpp's answer "
          f"identical to mesp's for {sum(a == b for a, b in zip(ours_texts, texts))}/{len(heldout)}")

    merged = adapter_gguf.parent / "merged.q8_0.gguf"
    merge_gguf(MODEL, adapter_dir, merged, quantize="q8_0")
    llm = llama(merged)
    merged_texts = answers(llm, questions)
    merged_score = score(merged_texts, heldout)
    print(f"merged Q8_0 GGUF: {merged_score}/{len(heldout)} correct; same answers as base + adapter: "
          f"{sum(a == b for a, b in zip(merged_texts, texts))}/{len(heldout)}")
    assert merged_score >= len(heldout) - 1
    print(f"time: training + export {train_seconds:.0f} s, llama.cpp checks + merge "
          f"{time.perf_counter() - started:.0f} s")
