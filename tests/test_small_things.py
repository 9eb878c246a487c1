"""Small things users meet: progress lines without a terminal, huge lines tokenized only up to a bound, a UTF-8
BOM, epochs with --grad-accum, TOML paths relative to the TOML file, the hint to use the adapter, --version, the
presets in --model's help, and data/--out errors before the model loads."""

from __future__ import annotations

import importlib
import json
import re

import pytest
from test_train import write_pretokenized

import mesp
from mesp.cli import main, package_version
from mesp.data import char_bound, check_data, load_data
from mesp.errors import MespError
from mesp.presets import PRESETS
from mesp.tokenizer import load_tokenizer
from mesp.train import TrainConfig, train


@pytest.fixture(scope="module")
def tiny(make_hf_model):
    path, _ = make_hf_model("qwen2", num_key_value_heads=2)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_pretokenized(tmp_path_factory.mktemp("data") / "train.jsonl", 10, seed=0)


def train_argv(tiny, data, out, *more):
    return ["train", "--model", tiny, "--data", data, "--out", str(out), "--seq-len", "32", "--batch-size", "3",
            *more]


def test_progress_lines_without_a_terminal_and_the_adapter_hint(tiny, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv(tiny, data, out, "--steps", "12")) == 0  # capsys: stdout is not a terminal
    text = capsys.readouterr().out
    steps = [int(m) for m in re.findall(r"^step (\d+)/12: loss \d+\.\d+, tok/s \d+, mem ", text, re.M)]
    assert steps == [1, 10, 12], text
    assert f"try it: mesp generate --model {tiny} --adapter {out} --prompt 'your prompt'" in text


class Recording:
    """A tokenizer that records the length of every string it is asked to tokenize."""

    def __init__(self, tok):
        self._tok, self.lengths = tok, []

    def __call__(self, text, *a, **kw):
        self.lengths.append(len(text))
        return self._tok(text, *a, **kw)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_a_huge_line_is_tokenized_only_up_to_a_bound(tmp_path, smollm2_gguf):
    tok = load_tokenizer(smollm2_gguf)
    seq_len = 64
    text = "".join(f"word{i % 97} and, {i}; " for i in range(40000))  # ~600k characters on one line
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n")
    rec = Recording(tok)
    ds = load_data(path, get_tokenizer=lambda: rec, seq_len=seq_len)
    bound = char_bound(tok, seq_len)
    assert max(rec.lengths) <= bound < len(text) // 4
    assert ds.n_truncated == 1
    assert ds.samples[0].input_ids.tolist() == tok(text)["input_ids"][:seq_len]  # the same tokens as in full


def test_a_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"input_ids": [5, 6, 7]}\n{"input_ids": [8, 9]}\n')
    check_data(path)
    ds = load_data(path)
    assert [s.input_ids.tolist() for s in ds.samples] == [[5, 6, 7], [8, 9]]


@pytest.mark.parametrize("n,batch_size,grad_accum,epochs,expected", [
    (3, 4, 2, 1, [1.0]),  # one micro-batch per epoch: the step must not take a second pass
    (10, 3, 3, 2, [0.75, 1.0, 1.75, 2.0]),  # 4 micro-batches per epoch: steps of 3 and 1
])
def test_epochs_with_grad_accum_count_passes(tiny, tmp_path, n, batch_size, grad_accum, epochs, expected):
    d = write_pretokenized(tmp_path / "d.jsonl", n, seed=2)
    out = tmp_path / "run"
    result = train(TrainConfig(model=tiny, data=d, out=str(out), seq_len=32, batch_size=batch_size,
                               grad_accum=grad_accum, epochs=epochs, method="mebp"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == expected and result.total_steps == len(expected)
    assert sum(r["trained_tokens"] for r in rows) == epochs * load_data(d).n_targets  # each sample once a pass


def test_toml_paths_are_relative_to_the_toml_file(tiny, tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    write_pretokenized(project / "data" / "train.jsonl", 4)
    cfg = project / "run.toml"
    cfg.write_text('data = "data/train.jsonl"\nvalid = "data/train.jsonl"\nout = "runs/a"\nmodel = "model"\n')
    (project / "model").symlink_to(tiny)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--config", "../project/run.toml", "--dry-run"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["data"] == shown["valid"] == str(project / "data" / "train.jsonl")
    assert shown["out"] == str(project / "runs" / "a") and shown["model"] == str(project / "model")
    # a preset stays a name, absolute paths stay as they are, and the library reads the file the same way
    cfg.write_text(f'model = "smollm2-135m-instruct"\ndata = "{tmp_path / "d.jsonl"}"\nout = "o"\n')
    c = TrainConfig.from_toml(cfg)
    assert (c.model, c.data, c.out) == ("smollm2-135m-instruct", str(tmp_path / "d.jsonl"), str(project / "o"))


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"mesp {package_version()}"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", package_version()) and mesp.__version__


@pytest.mark.parametrize("command", ["train", "generate", "merge"])
def test_model_help_lists_the_presets(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = re.sub(r"\s+", "", capsys.readouterr().out)  # argparse may wrap a name at its hyphens
    assert PRESETS and all(name in text for name in PRESETS)


@pytest.mark.parametrize("case,match", [
    ("missing data", r"nope\.jsonl: no such file"),
    ("bad data", r"bad\.jsonl:2: invalid JSON"),
    ("bad valid", r"bad\.jsonl:2: invalid JSON"),
    ("out under a file", r"is not a directory"),
])
def test_data_and_out_errors_come_before_the_model_loads(tiny, data, tmp_path, monkeypatch, case, match):
    def no_model(*a, **kw):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(importlib.import_module("mesp.train"), "load_model", no_model)  # (mesp.train: the function)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1, 2, 3]}\n{"input_ids": [1,\n')
    (tmp_path / "file").write_text("")
    kw = dict(model=tiny, data=data, out=str(tmp_path / "run"))
    kw.update({"missing data": dict(data=str(tmp_path / "nope.jsonl")), "bad data": dict(data=str(bad)),
               "bad valid": dict(valid=str(bad)), "out under a file": dict(out=str(tmp_path / "file" / "run"))}[case])
    with pytest.raises(MespError, match=match):
        train(TrainConfig(**kw))
    assert not (tmp_path / "run").exists()
