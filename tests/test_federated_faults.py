"""Faults and intruders in a real local federation (Flower's SuperLink and SuperNodes as processes, TLS and
SuperNode authentication on, as `mesp federated` runs by default):

- a SuperNode with a key the SuperLink does not know is refused, and the run says so;
- a client whose reply is NaN, of a wrong shape or a huge update (tests/faulty_client.py, a test-only fault
  injector) is left out and named, and every round's global adapter is the example-weighted mean of the
  others (<= 1e-6), each of which is what mesp trains in-process from the previous global adapter; an
  occupied port is skipped, and no port or process is left;
- a client SIGKILLed mid-round (with its SuperNode): the round completes with the others and names who
  dropped; the run fails with one line once fewer than --min-fraction reply;
- a launcher SIGKILLed mid-run, resumed with `mesp federated --out DIR --resume`, ends with the same final
  global adapter as an uninterrupted run.

Each runs a tiny random model for a few rounds of one local step. Skipped where Flower is not installed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("flwr")

import mesp.federated.local as launcher  # noqa: E402
from mesp.cli import main  # noqa: E402
from mesp.federated.credentials import make_node_key  # noqa: E402
from mesp.federated.local import FederationSettings, executable, run_local_federation  # noqa: E402
from mesp.federated.local_training import ClientSettings, train_client  # noqa: E402
from mesp.federated.processes import free_ports, port_is_free  # noqa: E402
from fed_helpers import (WEIGHTS, faulty_app_dir, federation_processes, supernode_of,  # noqa: E402
                         write_client_files)
from faulty_client import MARKERS  # noqa: E402

TRAINING = dict(local_steps=1, rank=2, seq_len=16, batch_size=2, lr=1e-2)


@pytest.fixture(scope="module")
def model(make_hf_model):
    path, hf = make_hf_model("llama")
    return str(path), hf.config.vocab_size


def global_adapter(out: Path, server_round: int) -> dict:
    return load_file(out / f"round-{server_round}" / "global" / WEIGHTS)


def weighted_mean(adapters: dict[str, dict], weights: dict[str, int]) -> dict:
    total = sum(weights.values())
    return {k: sum(adapters[n][k].double() * w for n, w in weights.items()) / total
            for k in next(iter(adapters.values()))}


def max_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_hostile_updates_are_left_out_and_an_unknown_node_is_refused(model, tmp_path, marked, monkeypatch):
    path, vocab = model
    sizes = {"alice": 3, "bob": 6, "mallory": 4}
    files = write_client_files(tmp_path / "data", vocab, sizes)
    monkeypatch.setattr(launcher, "APP_DIR", faulty_app_dir(tmp_path))
    intruder: dict = {}

    def on_event(event: dict) -> None:
        if event["event"] != "started":
            return
        assert event["tls"] is True
        key = make_node_key(tmp_path / "intruder-keys", "intruder")  # never registered with the SuperLink
        log = open(tmp_path / "intruder.log", "wb")
        intruder["process"] = subprocess.Popen(
            [executable("flower-supernode"), "--root-certificates", event["ca"], "--auth-supernode-private-key",
             str(key.private), "--superlink", event["superlink"], "--max-retries", "0", "--host", "127.0.0.1",
             "--port", str(free_ports(1)[0]), "--node-config", f'data="{files["alice"]}" name="intruder"'],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])})
        intruder["log"] = log

    try:
        with socket.socket() as taken:  # occupy a port and ask the launcher to start there
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            occupied = taken.getsockname()[1]
            settings = FederationSettings(model=path, clients=list(files.values()), rounds=3, port=occupied,
                                          out=str(tmp_path / "run"), round_timeout=120.0, **TRAINING)
            result = run_local_federation(settings, progress=on_event)
        code = intruder["process"].wait(timeout=60)
    finally:
        if "process" in intruder:  # it and whatever it started (its own session)
            try:
                os.killpg(intruder["process"].pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            intruder["process"].wait()
            intruder["log"].close()
    assert code != 0 and "Failed to activate SuperNode" in (tmp_path / "intruder.log").read_text()
    kinds = [e["event"] for e in result.events]
    assert "refused" in kinds, kinds

    out = Path(result.out)
    expected_reason = {1: "non-finite", 2: "has shape", 3: "exceeds --max-update-norm 1000"}
    previous = global_adapter(out, 0)
    for r, record in enumerate(result.rounds, start=1):
        assert [c["name"] for c in record["clients"]] == ["alice", "bob"], record
        assert [e["client"].split(" (node")[0] for e in record["rejected"]] == ["mallory"], record
        assert expected_reason[r] in record["rejected"][0]["reason"], record
        assert [e for e in result.events if e["event"] == "rejected" and e["round"] == r
                and e["client"].startswith("mallory")], "the launcher's progress names the rejected client"
        assert not (out / f"round-{r}" / "clients" / "mallory").exists()
        clients = {n: load_file(out / f"round-{r}" / "clients" / n / WEIGHTS) for n in ("alice", "bob")}
        assert {n: json.loads((out / f"round-{r}" / "clients" / n / "metrics.json").read_text())["num_examples"]
                for n in clients} == {"alice": 3, "bob": 6}
        assert max_difference(clients["alice"], clients["bob"]) > 0  # they trained differently: weights matter
        current = global_adapter(out, r)
        assert max_difference(current, weighted_mean(clients, {"alice": 3, "bob": 6})) <= 1e-6
        # what the server averaged is what mesp trains from the previous global adapter on each client's file
        for n in ("alice", "bob"):
            local = train_client(ClientSettings(model=path, steps=1, rounds=3, rank=2, seq_len=16, batch_size=2,
                                                lr=1e-2), files[n], previous, server_round=r)
            assert max_difference(local.tensors, clients[n]) <= 1e-6, (r, n)
        assert max_difference(current, previous) > 0  # the round changed the adapter: the check has teeth
        previous = current
    assert len(result.rounds) == 3
    assert occupied not in result.ports.values() and all(p > occupied for p in result.ports.values())
    assert federation_processes() == []
    assert all(port_is_free(p) for p in result.ports.values())


def kill_when_marked(markers: Path, names: list[str], killed: list[str], stop: threading.Event) -> None:
    """SIGKILL each doomed client's ClientApp process and SuperNode (its whole process group) once its marker
    says it is mid-round."""
    left = list(names)
    while left and not stop.is_set():
        for name in list(left):
            marker = markers / name
            if marker.is_file():
                node = supernode_of(name)
                os.kill(int(marker.read_text()), signal.SIGKILL)
                if node is not None:
                    os.killpg(os.getpgid(node), signal.SIGKILL)
                killed.append(name)
                left.remove(name)
        time.sleep(0.2)


def test_client_killed_mid_round_is_named_and_too_few_replies_fail_the_run(model, tmp_path, marked, monkeypatch,
                                                                          capsys):
    path, vocab = model
    files = write_client_files(tmp_path / "data", vocab, {"alice": 3, "doomed2": 6, "doomed3": 4})
    monkeypatch.setattr(launcher, "APP_DIR", faulty_app_dir(tmp_path))
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv(MARKERS, str(markers))
    killed: list[str] = []
    stop = threading.Event()
    killer = threading.Thread(target=kill_when_marked, args=(markers, ["doomed2", "doomed3"], killed, stop))
    killer.start()
    out = tmp_path / "run"
    try:
        # round 1: all three; round 2: doomed2 killed, 2 of 3 >= 0.6 x 3; round 3: doomed3 killed too, 1 left
        code = main(["federated", "--model", path, "--clients", ",".join(files.values()), "--rounds", "3",
                     "--local-steps", "1", "--rank", "2", "--seq-len", "16", "--batch-size", "2", "--lr", "1e-2",
                     "--out", str(out), "--min-fraction", "0.6", "--round-timeout", "40"])
    finally:
        stop.set()
        killer.join()
    captured = capsys.readouterr()
    assert killed == ["doomed2", "doomed3"]
    assert code == 2
    assert captured.err.count("\n") == 1 and captured.err.startswith("mesp federated: error:"), captured.err
    assert "round 3: 1 of" in captured.err and "needs 2" in captured.err and "doomed3" in captured.err, \
        captured.err
    assert "doomed2 supernode-doomed2 exited" in captured.out  # the launcher saw the SuperNode die
    assert "round 2: dropped doomed2" in captured.out, captured.out  # the ServerApp named who did not reply

    record = json.loads((out / "round-2" / "round.json").read_text())
    assert [c["name"] for c in record["clients"]] == ["alice", "doomed3"]
    assert [e["client"].split(" (node")[0] for e in record["dropped"]] == ["doomed2"]
    clients = {n: load_file(out / "round-2" / "clients" / n / WEIGHTS) for n in ("alice", "doomed3")}
    assert max_difference(global_adapter(out, 2), weighted_mean(clients, {"alice": 3, "doomed3": 4})) <= 1e-6
    assert not (out / "round-3" / "round.json").exists() and not (out / "summary.json").exists()
    assert federation_processes() == []


def test_killed_launcher_resumes_to_the_same_final_adapter(model, tmp_path, marked, capsys):
    path, vocab = model
    files = write_client_files(tmp_path / "data", vocab, {"alice": 3, "bob": 5})
    flags = ["--model", path, "--clients", ",".join(files.values()), "--rounds", "3", "--local-steps", "1",
             "--rank", "2", "--seq-len", "16", "--batch-size", "2", "--lr", "1e-2"]
    out = tmp_path / "interrupted"
    killed = subprocess.Popen([sys.executable, "-c", "import sys; from mesp.cli import main; "
                               "sys.exit(main(sys.argv[1:]))", "federated", *flags, "--out", str(out)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (out / "round-1" / "round.json").is_file():
            assert killed.poll() is None and time.monotonic() < deadline, "the first run ended before round 1"
            time.sleep(0.1)
        killed.kill()  # SIGKILL: no clean-up; its SuperLink, SuperNodes and ServerApp live on
    finally:
        killed.kill()
        killed.wait()
    assert not (out / "summary.json").exists()
    assert federation_processes(), "a SIGKILLed launcher leaves its federation behind"
    round1 = (out / "round-1" / "round.json").stat().st_mtime_ns
    home = Path(json.loads((out / "federation.json").read_text())["launcher"]["home"])
    assert (home / "keys").is_dir()  # the killed launcher's keys and certificates, left behind

    assert main(["federated", "--out", str(out), "--resume"]) == 0
    capsys.readouterr()
    assert federation_processes() == [] and not home.exists()  # what the killed launcher left is gone too
    assert (out / "round-1" / "round.json").stat().st_mtime_ns == round1  # round 1 was not run again
    assert [r["round"] for r in json.loads((out / "summary.json").read_text())["rounds"]] == [1, 2, 3]

    assert main(["federated", *flags, "--out", str(tmp_path / "uninterrupted")]) == 0
    resumed, uninterrupted = global_adapter(out, 3), global_adapter(tmp_path / "uninterrupted", 3)
    assert set(resumed) == set(uninterrupted)
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    assert max_difference(resumed, global_adapter(out, 2)) > 0  # the last round changed it
