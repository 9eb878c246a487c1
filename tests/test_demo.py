"""The demo: its bundled data, its scoring, and its plumbing end to end on a tiny model with SmolLM2's tokenizer."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

import mesp
from mesp.cli import main
from mesp.data import load_data
from mesp.demo import (HELDOUT_FILE, QA_PROMPT, TRAIN_FILE, VALID_FILE, Answer, DemoSettings, as_question_answer_text,
                       ask, contains_answer, load_heldout, run_demo)
from mesp.errors import MespError


@pytest.fixture(scope="session")
def smollm2_tok(smollm2_gguf):
    return mesp.load_tokenizer("smollm2-135m-instruct")


def assistant_texts(path):
    rows = [json.loads(line) for line in open(path)]
    return [m["content"] for r in rows for m in r["messages"] if m["role"] == "assistant"]


def user_texts(path):
    rows = [json.loads(line) for line in open(path)]
    return [m["content"] for r in rows for m in r["messages"] if m["role"] == "user"]


def test_bundled_data_parses_and_holds_out_paraphrases(smollm2_tok):
    train = load_data(TRAIN_FILE, get_tokenizer=lambda: smollm2_tok, seq_len=DemoSettings.seq_len)
    valid = load_data(VALID_FILE, get_tokenizer=lambda: smollm2_tok, seq_len=DemoSettings.seq_len)
    assert 60 <= len(train) <= 120 and train.formats == {"messages": len(train)} and train.n_truncated == 0
    assert len(valid) >= 5 and valid.n_truncated == 0
    heldout = load_heldout(HELDOUT_FILE)
    assert len(heldout) >= 10
    taught = assistant_texts(TRAIN_FILE)
    asked = {q.casefold() for q in user_texts(TRAIN_FILE) + user_texts(VALID_FILE)}
    facts = {a.expected for a in heldout}
    assert 8 <= len(facts) <= 12
    for a in heldout:
        assert a.question.strip() and a.expected.strip()
        assert a.question.casefold() not in asked  # a paraphrase, never a training or validation question
        assert sum(contains_answer(t, a.expected) for t in taught) >= 4  # the fact is taught several ways


def test_scoring_counts_answers_containing_the_expected_word():
    assert contains_answer("Ilse lives in LJUBLJANA, Slovenia.", "Ljubljana")
    assert not contains_answer("Ilse lives in Lisbon.", "Ljubljana")
    a = Answer("Where?", "teal", before="I like blue.", after="Her favourite colour is Teal.")
    assert (a.correct_before, a.correct_after) == (False, True)


def test_heldout_file_errors_name_the_line(tmp_path):
    p = tmp_path / "h.jsonl"
    p.write_text('{"question": "Q?", "answer": "A"}\n{"question": "Q2?"}\n')
    with pytest.raises(MespError, match=r"h.jsonl:2: 'answer' must be a non-empty string"):
        load_heldout(p)
    p.write_text('{"question": "Q?", "answer": "A"}\n{not json\n')
    with pytest.raises(MespError, match=r"h.jsonl:2: invalid JSON"):
        load_heldout(p)


@pytest.fixture(scope="session")
def tiny_chat_model(make_hf_model, smollm2_tok, tmp_path_factory):
    """A tiny random Llama with SmolLM2's vocabulary, tokenizer and chat template: the demo runs in seconds."""
    src, _ = make_hf_model("llama", vocab_size=len(smollm2_tok), eos_token_id=smollm2_tok.eos_token_id)
    path = tmp_path_factory.mktemp("tiny_chat")
    shutil.copytree(src, path, dirs_exist_ok=True)
    smollm2_tok.save_pretrained(str(path))
    return path


def tiny_settings(model_dir, tmp_path, n_questions=3):
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(HELDOUT_FILE.read_text().splitlines(keepends=True)[:n_questions]))
    return DemoSettings(model=str(model_dir), steps=2, batch_size=2, max_new_tokens=3, heldout_file=str(heldout))


def test_demo_plumbing_on_a_tiny_model(tiny_chat_model, tmp_path):
    settings = tiny_settings(tiny_chat_model, tmp_path)
    events = []
    out = tmp_path / "run"
    report = run_demo(settings, out=str(out), progress=events.append)

    kinds = [e["event"] for e in events]
    assert kinds[0] == "answers" and events[0]["phase"] == "before"
    assert kinds.count("step") == 2 and kinds[-3:] == ["answers", "memory", "process_memory"]
    assert events[-3]["phase"] == "after"
    assert report.train["steps"] == 2 and report.adapter_dir == str(out)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2

    # the answers are those of the base model and of the base model with the trained adapter
    model = mesp.load_model(tiny_chat_model)
    tok = mesp.load_tokenizer(model)
    questions = [a.question for a in report.answers]
    assert [a.before for a in report.answers] == ask(model, tok, questions, settings.max_new_tokens)
    mesp.load_adapter(model, out)
    assert [a.after for a in report.answers] == ask(model, tok, questions, settings.max_new_tokens)
    assert report.score == {"before": sum(a.correct_before for a in report.answers),
                            "after": sum(a.correct_after for a in report.answers), "total": 3}

    assert [m.method for m in report.memory] == ["mesp", "mebp"]
    mesp_peak, mebp_peak = (m.peak_bytes for m in report.memory)
    assert 0 < mesp_peak < mebp_peak  # MeBP holds full-vocabulary logits, MeSP never does
    assert report.memory_batch[0] == 2 and report.peak_rss_bytes > 0
    for m in report.memory:  # each step peak from its own fresh `mesp train --measure-memory` process
        assert m.command.startswith("mesp train --model ") and f"--method {m.method}" in m.command
        assert "--measure-memory" in m.command and "--steps 1 " in m.command
    # each method's whole-process figure comes from its own fresh `mesp train` process
    assert [p.method for p in report.process_memory] == ["mesp", "mebp"]
    for p in report.process_memory:
        assert p.command.startswith("mesp train --model ") and f"--method {p.method}" in p.command
        if p.private_peak_bytes is not None:  # Linux
            assert p.rss_peak_bytes >= p.private_peak_bytes >= report.runtime_floor_bytes > 0
            assert "load" in p.stage_private_peaks


def test_demo_refuses_an_out_holding_another_run_before_any_work(tiny_chat_model, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    events = []
    with pytest.raises(MespError, match="holds another run"):
        run_demo(tiny_settings(tiny_chat_model, tmp_path), out=str(out), progress=events.append)
    assert events == [] and (out / "adapter_config.json").read_text() == "{}"


def test_cli_demo_prints_answers_score_and_memory(tiny_chat_model, tmp_path, capsys, monkeypatch):
    import mesp.cli

    base = tiny_settings(tiny_chat_model, tmp_path, n_questions=2)
    monkeypatch.setattr(mesp.cli, "DemoSettings", lambda **kw: dataclasses.replace(base, **kw))
    assert main(["demo", "--steps", "1"]) == 0
    printed = capsys.readouterr().out
    for text in ("Before training", "After training", "score: ", "mesp ", "mebp ", "own process peak RSS",
                 "pass --out DIR", "whole-process peak of a fresh `mesp train` process",
                 "runtime floor (python + torch import)"):
        assert text in printed
    assert printed.index("Before training") < printed.index("step    1/1") < printed.index("After training")


def test_demo_teaches_a_model_without_chat_template_plain_question_answer_text(tiny_chat_model, tmp_path):
    """A base model (Gemma 3 270M's GGUF has no chat template) is taught and asked in QA_PROMPT form."""
    plain = tmp_path / "plain"
    shutil.copytree(tiny_chat_model, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    assert not mesp.load_tokenizer(plain).chat_template

    qa = as_question_answer_text(TRAIN_FILE, tmp_path / "qa.jsonl")
    rows = [json.loads(line) for line in open(qa)]
    assert len(rows) == len(assistant_texts(TRAIN_FILE))
    assert rows[0] == {"prompt": QA_PROMPT.format(question=user_texts(TRAIN_FILE)[0]),
                       "completion": " " + assistant_texts(TRAIN_FILE)[0]}

    settings = dataclasses.replace(tiny_settings(plain, tmp_path), model=str(plain), process_steps=0)
    out = tmp_path / "run"
    report = run_demo(settings, out=str(out))
    assert report.train["steps"] == 2
    model = mesp.load_model(plain)
    tok = mesp.load_tokenizer(model)
    mesp.load_adapter(model, out)
    asked = [mesp.generate(model, tok, QA_PROMPT.format(question=a.question), max_new_tokens=3).strip().split("\n")[0]
             for a in report.answers]
    assert [a.after for a in report.answers] == asked
