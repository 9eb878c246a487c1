"""mesp federated with real Flower processes on 127.0.0.1 (a SuperLink, a SuperNode per client file): FedAvg's
round-1 global adapter is the example-weighted mean of the adapters the clients returned, each of which is
exactly what mesp trains locally from the round-0 adapter; an occupied port is skipped; a malformed client
file, or a client that fails mid-run, ends the run with one line naming the file, exit status 2, and no
process or port left behind. Skipped where Flower (mesp[federated]) is not installed."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("flwr")

from mesp.cli import main  # noqa: E402
from mesp.federated.local import FederationSettings, run_local_federation  # noqa: E402
from mesp.federated.processes import port_is_free  # noqa: E402
from mesp.federated.local_training import ClientSettings, train_client  # noqa: E402
from fed_helpers import WEIGHTS, federation_processes, write_client_files  # noqa: E402


@pytest.fixture(scope="module")
def tiny(make_hf_model, tmp_path_factory):
    path, hf = make_hf_model("llama")
    # unequal sizes: the weights matter
    files = write_client_files(tmp_path_factory.mktemp("fed_data"), hf.config.vocab_size,
                               {"alice": 3, "bob": 6, "carol": 4})
    return str(path), files


def test_round1_global_is_example_weighted_mean_and_occupied_port_is_skipped(tiny, tmp_path, marked):
    model, files = tiny
    with socket.socket() as taken:  # occupy a port and ask the launcher to start there
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        occupied = taken.getsockname()[1]
        settings = FederationSettings(model=model, clients=list(files.values()), rounds=2, local_steps=2,
                                      out=str(tmp_path / "run"), rank=2, seq_len=16, batch_size=2, lr=1e-2,
                                      port=occupied)
        result = run_local_federation(settings)
    assert occupied not in result.ports.values()
    assert all(p > occupied for p in result.ports.values())
    assert all(port_is_free(p) for p in result.ports.values())  # nothing left listening
    assert federation_processes() == []
    assert [r["round"] for r in result.rounds] == [1, 2]

    out = Path(result.out)
    start = load_file(out / "round-0" / "global" / WEIGHTS)
    clients = {name: load_file(out / "round-1" / "clients" / name / WEIGHTS) for name in files}
    counts = {name: json.loads((out / "round-1" / "clients" / name / "metrics.json").read_text())["num_examples"]
              for name in files}
    assert counts == {"alice": 3, "bob": 6, "carol": 4}
    total = sum(counts.values())
    merged = load_file(out / "round-1" / "global" / WEIGHTS)
    assert set(merged) == set(start) and len(merged) > 0
    for key, value in merged.items():
        expected = sum(clients[n][key].double() * counts[n] for n in files) / total
        assert torch.allclose(value.double(), expected, rtol=0, atol=1e-6), key
    # the clients really trained, differently (else the average would prove nothing)
    b_key = next(k for k in start if ".lora_B." in k)
    assert not torch.equal(clients["alice"][b_key], clients["bob"][b_key])
    assert not torch.equal(merged[b_key], start[b_key])

    # each returned adapter is what mesp trains in-process from the round-0 adapter on the client's own file
    local = train_client(ClientSettings(model=model, steps=2, rounds=2, rank=2, seq_len=16, batch_size=2, lr=1e-2),
                         files["alice"], start, server_round=1)
    for key, value in clients["alice"].items():
        assert torch.allclose(local.tensors[key], value, rtol=1e-5, atol=1e-7), key
    assert (out / "round-2" / "global" / WEIGHTS).is_file()
    assert (out / "round-2" / "clients" / "carol" / "metrics.json").is_file()


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
