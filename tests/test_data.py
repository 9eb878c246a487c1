"""Training data: every JSONL format with its exact loss mask (SmolLM2's tokenizer and chat template),
truncation counting, padding, the seeded per-epoch order, and bad input named by file and line."""

from __future__ import annotations

import json

import pytest
import torch

from mesp.data import IGNORE, MicroBatchStream, collate, epoch_order, load_data
from mesp.errors import MespError
from mesp.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)  # the tokenizer alone: no weights are read


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def runs(labels: torch.Tensor) -> list[tuple[int, int]]:
    """Maximal [start, end) runs of positions whose label is not IGNORE."""
    out, start = [], None
    for i, lab in enumerate(labels.tolist() + [IGNORE]):
        if lab != IGNORE and start is None:
            start = i
        elif lab == IGNORE and start is not None:
            out.append((start, i))
            start = None
    return out


def only_sample(tmp_path, tok, row, **kw):
    ds = load_data(write_jsonl(tmp_path / "d.jsonl", [row]), get_tokenizer=lambda: tok, **kw)
    assert len(ds) == 1
    return ds.samples[0]


CONVERSATION = [{"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": "Who wrote Hamlet?"},
                {"role": "assistant", "content": "Shakespeare."},
                {"role": "user", "content": "And when?"},
                {"role": "assistant", "content": "Around 1600."}]


def test_messages_loss_only_on_assistant_turns(tmp_path, tok):
    s = only_sample(tmp_path, tok, {"messages": CONVERSATION})
    ids, labels = s.input_ids, s.labels
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
    trained = runs(labels)
    assert len(trained) == 2
    # each run is exactly one assistant turn with its end-of-turn marker ...
    assert [tok.decode(ids[a:b]) for a, b in trained] == ["Shakespeare.<|im_end|>\n", "Around 1600.<|im_end|>\n"]
    # ... preceded by exactly what `generate --chat` would feed the model
    prompt1 = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    prompt2 = tok.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True)
    assert tok.decode(ids[:trained[0][0]]) == prompt1
    assert tok.decode(ids[:trained[1][0]]) == prompt2
    assert torch.equal(labels[labels != IGNORE], ids[labels != IGNORE])
    assert s.n_targets == sum(b - a for a, b in trained)


def test_prompt_completion_uses_the_chat_template(tmp_path, tok):
    s = only_sample(tmp_path, tok, {"prompt": "What is 2+2?", "completion": "4", "id": 7})  # extra keys ignored
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                     add_generation_prompt=True)
    ((a, b),) = runs(s.labels)
    assert b == len(s.input_ids)
    assert tok.decode(s.input_ids[:a]) == prompt
    assert tok.decode(s.input_ids[a:]) == "4<|im_end|>\n"


def test_train_on_prompt_and_text_format(tmp_path, tok):
    s = only_sample(tmp_path, tok, {"messages": CONVERSATION}, train_on_prompt=True)
    assert torch.equal(s.labels, s.input_ids)
    s = only_sample(tmp_path, tok, {"text": "The quick brown fox."})
    assert s.input_ids.tolist() == tok("The quick brown fox.")["input_ids"] + [tok.eos_token_id]
    assert torch.equal(s.labels, s.input_ids)


def test_prompt_completion_without_a_chat_template(tmp_path, tok):
    plain = _PlainTokenizer(tok)
    s = only_sample(tmp_path, plain, {"prompt": "Q: capital of France? A:", "completion": " Paris"})
    head = tok("Q: capital of France? A:")["input_ids"]
    tail = tok(" Paris", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert s.input_ids.tolist() == head + tail
    assert s.labels.tolist() == [IGNORE] * len(head) + tail


class _PlainTokenizer:
    """SmolLM2's tokenizer without its chat template (a base model's)."""
    chat_template = None

    def __init__(self, tok):
        self._tok, self.eos_token_id = tok, tok.eos_token_id

    def __call__(self, *a, **kw):
        return self._tok(*a, **kw)


def test_pretokenized_needs_no_tokenizer(tmp_path):
    rows = [{"input_ids": [5, 6, 7, 8]}, {"input_ids": [1, 2, 3], "labels": [-100, 2, -100]}]
    ds = load_data(write_jsonl(tmp_path / "d.jsonl", rows), get_tokenizer=None, vocab_size=10)
    assert [s.labels.tolist() for s in ds.samples] == [[5, 6, 7, 8], [-100, 2, -100]]
    assert [s.n_targets for s in ds.samples] == [3, 1]  # the first label is never a target (shift)
    assert ds.formats == {"input_ids": 2} and [s.line for s in ds.samples] == [1, 2]
    # explicit labels are kept under train_on_prompt; samples without them train on everything anyway
    ds = load_data(tmp_path / "d.jsonl", train_on_prompt=True)
    assert ds.samples[1].labels.tolist() == [-100, 2, -100]


def test_truncation_is_counted(tmp_path):
    rows = [{"input_ids": list(range(n))} for n in (3, 8, 5, 12)]
    ds = load_data(write_jsonl(tmp_path / "d.jsonl", rows), seq_len=5)
    assert ds.n_truncated == 2
    assert [len(s.input_ids) for s in ds.samples] == [3, 5, 5, 5]
    assert ds.samples[3].input_ids.tolist() == [0, 1, 2, 3, 4]  # the first seq_len tokens are kept


def test_collate_pads_right_and_masks_pads():
    from mesp.data import Sample
    a = Sample(torch.tensor([4, 5, 6]), torch.tensor([-100, 5, 6]), 1)
    b = Sample(torch.tensor([7]), torch.tensor([7]), 2)
    batch = collate([a, b])
    assert batch.input_ids.tolist() == [[4, 5, 6], [7, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.labels.tolist() == [[-100, 5, 6], [7, -100, -100]]
    assert batch.n_tokens == 4 and batch.n_targets == 2


def test_order_depends_only_on_seed_and_epoch():
    assert epoch_order(10, 3, 1) == epoch_order(10, 3, 1)
    assert sorted(epoch_order(10, 3, 1)) == list(range(10))
    assert epoch_order(10, 3, 0) != epoch_order(10, 3, 1) and epoch_order(10, 3, 0) != epoch_order(10, 4, 0)
    stream = MicroBatchStream(10, batch_size=4, seed=3)
    assert stream.per_epoch == 3
    e0, e1 = epoch_order(10, 3, 0), epoch_order(10, 3, 1)
    assert [stream.indices(m) for m in range(6)] == [e0[:4], e0[4:8], e0[8:], e1[:4], e1[4:8], e1[8:]]
    # any position can be reached directly (resume)
    assert MicroBatchStream(10, 4, 3).indices(4) == e1[4:8]


@pytest.mark.parametrize("rows,match", [
    (['{"input_ids": [1, 2]}', '{"input_ids": [1, 2'], r"d\.jsonl:2: invalid JSON"),
    (['[1, 2, 3]'], r"d\.jsonl:1: expected a JSON object"),
    ([{"input_ids": [1, 2]}, {"prompt": "x"}], r"d\.jsonl:2: missing field 'completion'"),
    ([{"question": "x", "answer": "y"}], r"d\.jsonl:1: unknown format \(keys: answer, question\)"),
    ([{"text": "a", "input_ids": [1, 2]}], r"d\.jsonl:1: ambiguous"),
    ([{"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}], r"d\.jsonl:1: no token to train on"),
    ([{"input_ids": [1, 2, 3], "labels": [1, 2]}], r"d\.jsonl:1: 'labels' has 2 entries"),
    ([{"input_ids": [1, 99]}], r"d\.jsonl:1: input_ids holds 99, outside the vocabulary"),
    ([{"input_ids": ["a"]}], r"d\.jsonl:1: field 'input_ids' must be a list of integers"),
    ([{"input_ids": [1, 2]}, {"text": "hello"}], r"d\.jsonl:2: the 'text' format needs a tokenizer"),
    ([], r"d\.jsonl: no samples"),
    (["", "   "], r"d\.jsonl: no samples"),
])
def test_bad_input_names_file_and_line(tmp_path, rows, match):
    with pytest.raises(MespError, match=match):
        load_data(write_jsonl(tmp_path / "d.jsonl", rows), vocab_size=50)


@pytest.mark.parametrize("row,match", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no token to train on .*no assistant message"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\]: missing field 'content'"),
    ({"messages": "hi"}, "must be a non-empty list"),
    ({"prompt": "a", "completion": 3}, "'completion' must be a string"),
])
def test_bad_chat_samples(tmp_path, tok, row, match):
    with pytest.raises(MespError, match=match):
        load_data(write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, row]), get_tokenizer=lambda: tok)


def test_truncation_that_removes_every_target_is_an_error(tmp_path, tok):
    long_prompt = {"prompt": "word " * 50, "completion": "answer"}
    with pytest.raises(MespError, match=r"d\.jsonl:1: no token to train on after truncation to seq_len 16"):
        load_data(write_jsonl(tmp_path / "d.jsonl", [long_prompt]), get_tokenizer=lambda: tok, seq_len=16)
