"""mesp federated with real Flower processes on 127.0.0.1 (a SuperLink, a SuperNode per client file): a
malformed client file, or a client that fails mid-run, ends the run with one line naming the file, exit
status 2, and no process left behind; bad settings fail before any process starts. (FedAvg's averages, an
occupied port, hostile replies, intruders, dropouts and resume: tests/test_federated_faults.py.) Skipped
where Flower (mesp[federated]) is not installed."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("flwr")

from mesp.cli import main  # noqa: E402
from fed_helpers import federation_processes, write_client_files  # noqa: E402


@pytest.fixture(scope="module")
def tiny(make_hf_model, tmp_path_factory):
    path, hf = make_hf_model("llama")
    # unequal sizes: the weights matter
    files = write_client_files(tmp_path_factory.mktemp("fed_data"), hf.config.vocab_size,
                               {"alice": 3, "bob": 6, "carol": 4})
    return str(path), files


def test_malformed_client_file_is_named_before_any_process_starts(tiny, tmp_path, capsys, marked):
    model, files = tiny
    bad = tmp_path / "dave.jsonl"
    bad.write_text('{"input_ids": [1, 2, 3]}\n{"input_ids": [1, 2\n')
    out = tmp_path / "run"
    code = main(["federated", "--model", model, "--clients", f"{files['alice']},{bad}", "--rounds", "1",
                 "--local-steps", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and f"{bad}:2: invalid JSON" in err
    assert not out.exists()
    assert federation_processes() == []


def test_client_failing_mid_run_ends_it_with_one_line_and_nothing_left(tiny, tmp_path, capsys, marked):
    model, files = tiny
    bad = tmp_path / "erin.jsonl"
    bad.write_text('{"input_ids": [1, 2, 100000]}\n')  # well-formed, but outside the model's vocabulary
    code = main(["federated", "--model", model, "--clients", f"{files['alice']},{bad}", "--rounds", "2",
                 "--local-steps", "1", "--out", str(tmp_path / "run"), "--rank", "2", "--seq-len", "16",
                 "--min-fraction", "1"])  # every client must be averaged: one failure ends the run
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("mesp federated: error:") and str(bad) in err
    assert "outside the vocabulary" in err
    assert federation_processes() == []
    assert not (tmp_path / "run" / "summary.json").exists()


def test_bad_settings_fail_before_any_process(tiny, tmp_path, capsys, marked):
    model, files = tiny
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    for argv, needle in ((["--rounds", "0"], "--rounds"),
                         (["--out", str(tmp_path / "full")], "not an empty directory"),
                         (["--clients", f"{files['alice']},{files['alice']}"], "share the client name")):
        base = {"--model": model, "--clients": files["alice"], "--out": str(tmp_path / "new")}
        flags = dict(zip(argv[::2], argv[1::2]))
        args = ["federated"] + [x for k, v in {**base, **flags}.items() for x in (k, v)]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
    assert os.listdir(tmp_path) == ["full"]
