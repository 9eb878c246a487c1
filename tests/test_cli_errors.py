"""Every failure of every command ends in one line on stderr and exit 2: what the user can fix is said plainly
(devices, paths the system refuses), anything else is named a bug, and -v shows its traceback."""

from __future__ import annotations

import json

import pytest

import mesp.cli
from mesp.cli import main
from mesp.generate import generate_ids
from mesp.loaders import load_model


@pytest.fixture(scope="module")
def tiny(make_hf_model):
    path, _ = make_hf_model("qwen2", num_key_value_heads=2)
    return str(path)


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps({"input_ids": [1, 2, 3, 4, 5, 6]}) + "\n" for _ in range(4)))
    return str(p)


def one_error_line(capsys, argv) -> str:
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("device,expected", [
    ("tpu", "device: unknown 'tpu'"),
    ("meta", "device: 'meta' is not supported"),
    ("cuda:99", "device: 'cuda:99' is not available"),
])
def test_unknown_or_unavailable_device(capsys, tiny, data, tmp_path, device, expected):
    line = one_error_line(capsys, ["train", "--model", tiny, "--data", data, "--steps", "1", "--seq-len", "16",
                                   "--out", str(tmp_path / "run"), "--device", device])
    assert expected in line


def test_output_path_the_system_refuses(capsys, tiny, data, tmp_path):
    """A file where a parent directory should be: the OS error, with its path, as one line."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    line = one_error_line(capsys, ["train", "--model", tiny, "--data", data, "--steps", "1", "--seq-len", "16",
                                   "--out", str(blocker / "run")])
    assert str(blocker) in line and "not a directory" in line.lower()
    assert blocker.read_text() == "not a directory"


def test_an_os_refusal_is_one_line_naming_the_path(capsys, monkeypatch):
    """Whatever the system refuses deep inside a command (a read-only mount, a full disk) reaches the user as the
    path and the reason, not a traceback."""
    import errno

    def refused(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/mnt/full/adapter_model.safetensors")
    help_text, args_fn, _ = mesp.cli.COMMANDS["generate"]
    monkeypatch.setitem(mesp.cli.COMMANDS, "generate", (help_text, args_fn, refused))
    line = one_error_line(capsys, ["generate", "--model", "x", "--prompt", "hi"])
    assert line == "mesp generate: error: /mnt/full/adapter_model.safetensors: No space left on device"


def test_an_unexpected_failure_is_one_line_that_says_bug(capsys, monkeypatch):
    def broken(args):
        raise ValueError("something mesp did not foresee\nover two lines")
    help_text, args_fn, _ = mesp.cli.COMMANDS["generate"]
    monkeypatch.setitem(mesp.cli.COMMANDS, "generate", (help_text, args_fn, broken))
    argv = ["generate", "--model", "x", "--prompt", "hi"]
    line = one_error_line(capsys, argv)
    assert "internal error: ValueError: something mesp did not foresee over two lines" in line
    assert "bug" in line and "-v" in line
    assert main(["-v", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "raise ValueError" in err


def test_out_of_memory_is_one_line(capsys, monkeypatch):
    def broken(args):
        raise MemoryError()
    help_text, args_fn, _ = mesp.cli.COMMANDS["generate"]
    monkeypatch.setitem(mesp.cli.COMMANDS, "generate", (help_text, args_fn, broken))
    assert "out of memory" in one_error_line(capsys, ["generate", "--model", "x", "--prompt", "hi"])


def test_generation_stops_at_the_models_context(tiny):
    """--max-new-tokens 10**9 would grow the KV cache without bound: the model's context bounds it."""
    model = load_model(tiny)
    context = model.config.max_position_embeddings
    out = list(generate_ids(model, [5, 6, 7], max_new_tokens=10 ** 9))
    assert len(out) == context - 3
    with pytest.raises(mesp.MespError, match="fill the model's context"):
        list(generate_ids(model, list(range(context)), max_new_tokens=1))
