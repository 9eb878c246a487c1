"""`mesp federated`: a whole Flower federation on this machine, on 127.0.0.1, for one run.

    result = run_local_federation(FederationSettings(model="smollm2-135m-instruct",
                                                     clients=["a.jsonl", "b.jsonl"], rounds=3, local_steps=10,
                                                     out="runs/fed"), progress=print)

It validates every client file first (a malformed one is a MespError naming it, before any process starts),
writes the settings to OUT/federation.json (what `--resume` reads), picks free ports (each bind-tested; an
occupied one is skipped) and makes a private Flower home (FLWR_HOME) holding one SuperLink connection and
throw-away credentials (mesp.federated.credentials): a CA and the SuperLink's TLS certificate, and one key
pair per SuperNode. It starts the SuperLink with TLS and SuperNode authentication, registers every client's
public key (`flwr supernode register`), starts one SuperNode per client file (node config: the file and its
stem as the client's name), runs the mesp app (mesp.federated.APP_DIR) with `flwr run --stream` and forwards
the ServerApp's progress. A SuperNode that exits is reported as a dropout (the ServerApp decides whether the
round still stands); a SuperNode the SuperLink refuses is reported too. With `insecure` it runs Flower's
`--insecure` instead: no TLS, and no SuperNode authentication (Flower allows it only over TLS).

Every process it starts runs in its own process group and carries a tag in its environment; on success,
failure or Ctrl-C all of them are stopped (SIGTERM, then SIGKILL), any tagged straggler too, and the Flower
home is removed. A launcher that was killed outright leaves its processes and Flower home behind: `resume`
stops and removes those first (their tag and path are in federation.json). Flower's logs stay in OUT/logs/.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..data import check_data, read_jsonl
from ..errors import MespError
from ..fileio import write_json
from . import APP_DIR, PROGRESS_MARK, ROUND_RECORD, SETTINGS, SUMMARY
from .checks import DEFAULT_MAX_UPDATE_NORM
from .credentials import make_node_key, make_tls
from .local_training import ClientSettings
from .processes import (HOST, STOP_GRACE, TAG_VARIABLE, ProcessGroup, free_ports, last_line, signal_group,
                        tagged_processes, wait_until_listening)

log = logging.getLogger(__name__)

CONNECTION = "mesp-local"
HOME_PREFIX = "mesp-flwr-home-"  # the private Flower home of a run, in the temporary directory
REFUSED_MARK = "No SuperNode found with the given public key"  # the SuperLink's log line for an unknown key


@dataclass
class FederationSettings:
    """A local federation run: `mesp federated`'s flags."""
    model: str
    clients: list[str]
    rounds: int
    local_steps: int
    out: str
    method: str = "mesp"
    memory_budget_mb: float | None = None
    rank: int = 8
    alpha: float = 16.0
    lr: float | None = None
    batch_size: int = 4
    seq_len: int = 256
    warmup: int = 0
    seed: int = 0
    valid: str | None = None
    port: int | None = None  # first port to try; None: any free ports
    insecure: bool = False  # Flower's --insecure: no TLS and no SuperNode authentication
    max_update_norm: float | None = DEFAULT_MAX_UPDATE_NORM  # None: no bound on a returned update's norm
    min_fraction: float = 0.5  # of a round's clients that must be averaged
    round_timeout: float = 3600.0  # seconds a round waits for replies
    join_timeout: float = 120.0  # seconds the first round waits for every SuperNode

    def client_settings(self) -> ClientSettings:
        return ClientSettings(model=self.model, steps=self.local_steps, rounds=self.rounds, method=self.method,
                              rank=self.rank, alpha=self.alpha, lr=self.lr, batch_size=self.batch_size,
                              seq_len=self.seq_len, warmup=self.warmup, seed=self.seed)


@dataclass
class FederationResult:
    out: str
    rounds: list[dict]  # per round: train_loss, each averaged client's metrics, who dropped, who was rejected
    valid_loss: dict | None
    seconds: float
    ports: dict = field(default_factory=dict)  # role -> port used
    events: list[dict] = field(default_factory=list)  # the launcher's own: dropouts and refusals it saw


# ---- checks before any process starts ------------------------------------------------------------------

def client_name(path: str) -> str:
    return Path(path).stem


def check_client_files(paths: list[str]) -> None:
    """Every client file exists and each line is a sample in a format mesp trains on (mesp.data.check_data,
    no tokenizer needed); the names are distinct."""
    if not paths:
        raise MespError("--clients: give at least one JSONL file")
    seen: dict[str, str] = {}
    for p in paths:
        name = client_name(p)
        if name in seen:
            raise MespError(f"--clients: {seen[name]} and {p} share the client name {name!r} (the file stem)")
        seen[name] = p
        check_data(p)
        if next(read_jsonl(p), None) is None:
            raise MespError(f"{p}: no samples (the file is empty)")


def check_settings(s: FederationSettings, resume: bool = False) -> None:
    for name in ("rounds", "local_steps"):
        v = getattr(s, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise MespError(f"--{name.replace('_', '-')}: must be a positive integer, got {v!r}")
    if s.memory_budget_mb is not None and not s.memory_budget_mb > 0:
        raise MespError(f"--memory-budget: must be a positive number of MiB, got {s.memory_budget_mb!r}")
    if s.port is not None and not 1024 <= s.port <= 65535:
        raise MespError(f"--port: must be in 1024..65535, got {s.port}")
    if s.max_update_norm is not None and not s.max_update_norm > 0:
        raise MespError(f"--max-update-norm: must be a positive number, got {s.max_update_norm!r}")
    if not 0 < s.min_fraction <= 1:
        raise MespError(f"--min-fraction: must be in (0, 1], got {s.min_fraction!r}")
    for name in ("round_timeout", "join_timeout"):
        if not getattr(s, name) > 0:
            raise MespError(f"--{name.replace('_', '-')}: must be a positive number of seconds")
    s.client_settings().train_config(os.devnull)  # method, rank, lr ... checked by mesp train's rules
    out = Path(s.out)
    if not resume and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MespError(f"--out: {out} exists and is not an empty directory (--resume continues a run there)")
    if s.valid:
        check_data(s.valid)
    check_client_files(s.clients)


def last_complete_round(out: Path) -> int:
    """The highest N with round-N/round.json (written after round N's global adapter), 0 if none."""
    done = [int(p.parent.name.split("-")[1]) for p in out.glob(f"round-*/{ROUND_RECORD}")
            if p.parent.name.split("-")[1].isdigit()]
    return max(done, default=0)


def read_resume(out_dir: str) -> tuple[FederationSettings, dict]:
    """The settings of the run in out_dir (federation.json) and its launcher record (tag, pid)."""
    path = Path(out_dir) / SETTINGS
    try:
        saved = json.loads(path.read_text())
        settings = FederationSettings(**saved["settings"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise MespError(f"--resume: {path}: not the record of a mesp federated run ({e})") from e
    return settings, saved["launcher"]


def stop_previous_launcher(launcher: dict, out: Path) -> None:
    """Before resuming: refuse while the run's launcher still lives; stop what a killed one left behind (its
    processes, and its Flower home with the run's keys)."""
    pid = int(launcher.get("pid", 0))
    if pid and pid != os.getpid() and Path(f"/proc/{pid}").exists():
        try:
            alive = launcher.get("tag", "").encode() in (Path(f"/proc/{pid}") / "environ").read_bytes() or \
                "mesp" in (Path(f"/proc/{pid}") / "cmdline").read_text(errors="replace")
        except OSError:
            alive = False
        if alive:
            raise MespError(f"--resume: {out} is in use by a running mesp federated (pid {pid})")
    for left in tagged_processes(str(launcher.get("tag", ""))):
        log.warning("stopping process %d left by the interrupted run", left)
        signal_group(left, signal.SIGKILL)
        try:
            os.kill(left, signal.SIGKILL)
        except OSError:
            pass
    home = Path(str(launcher.get("home", "")))
    if home.name.startswith(HOME_PREFIX) and home.is_dir():  # its keys and certificates: never kept
        shutil.rmtree(home, ignore_errors=True)


def executable(name: str) -> str:
    """A Flower command from this Python's environment (else PATH)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise MespError(f"{name}: not found; install Flower with: pip install 'mesp[federated]'")
    return found


def toml_pairs(config: dict) -> str:
    """A run config as `flwr run --run-config` takes it: space-separated TOML key=value pairs."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())


def read_lines(stream, into: queue.Queue) -> None:
    for raw in iter(stream.readline, b""):
        into.put(raw.decode("utf-8", errors="replace"))
    into.put(None)


# ---- the run -------------------------------------------------------------------------------------------

def run_local_federation(s: FederationSettings, progress: Callable[[dict], None] | None = None,
                         resume: bool = False) -> FederationResult:
    """Run the federation (see the module docstring). progress(event) receives {"event": "ports", ...},
    {"event": "started", ...}, the launcher's "dropout" and "refused" and the ServerApp's events ("start",
    "round", "dropped", "rejected", "eval", "done"). With `resume`, s.out holds an interrupted run: it
    continues from its last complete round (s's other fields are ignored: the run's own settings are read)."""
    emit = progress or (lambda event: None)
    started = time.perf_counter()
    tag = uuid.uuid4().hex
    if resume:
        s, launcher = read_resume(s.out)
        stop_previous_launcher(launcher, Path(s.out))
    s.clients = [os.path.abspath(c) for c in s.clients]
    s.valid = os.path.abspath(s.valid) if s.valid else None
    check_settings(s, resume)
    commands = {name: executable(name) for name in ("flower-superlink", "flower-supernode", "flwr")}
    out = Path(s.out).resolve()
    first = last_complete_round(out) if resume else 0
    if resume and (out / SUMMARY).is_file():
        raise MespError(f"--resume: {out} holds a finished run (summary.json)")
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix=HOME_PREFIX))
    write_json(out / SETTINGS, {"settings": dataclasses.asdict(s),
                                "launcher": {"pid": os.getpid(), "tag": tag, "home": str(home)}})
    mesp_root = str(Path(__file__).resolve().parents[2])  # so every Flower process imports this mesp
    # Flower starts its helpers (flower-superexec ...) by name: the directory of the commands found comes first
    bin_dirs = list(dict.fromkeys(str(Path(c).parent) for c in commands.values()))
    env = {**os.environ, "FLWR_HOME": str(home), TAG_VARIABLE: tag,
           "PATH": os.pathsep.join(bin_dirs + [os.environ.get("PATH", "")]),
           "PYTHONPATH": os.pathsep.join(filter(None, [mesp_root, os.environ.get("PYTHONPATH")]))}
    group = ProcessGroup(env, log_dir, tag)
    previous_term = None
    events: list[dict] = []

    def note(event: dict) -> None:
        events.append(event)
        emit(event)

    if threading.current_thread() is threading.main_thread():  # a SIGTERM to us stops the federation too
        previous_term = signal.signal(signal.SIGTERM, raise_interrupt)
    error = None
    try:
        ports = free_ports(1 + len(s.clients), s.port)
        link_port, node_ports = ports[0], ports[1:]
        names = [client_name(c) for c in s.clients]
        used = {"superlink": link_port, **dict(zip(names, node_ports))}
        emit({"event": "ports", "ports": used})
        tls = None if s.insecure else make_tls(home / "tls")
        security = 'insecure = true\n' if tls is None else f'root-certificates = "{tls.ca}"\n'
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{HOST}:{link_port}"\n{security}')
        app_dir = home / "app"
        shutil.copytree(APP_DIR, app_dir, ignore=shutil.ignore_patterns("__pycache__"))
        link_security = ["--insecure"] if tls is None else [
            "--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key),
            "--enable-supernode-auth"]
        link = group.start("superlink", [commands["flower-superlink"], *link_security, "--host", HOST, "--port",
                                         str(link_port), "--disable-runtime-dependency-installation"])
        wait_until_listening(link_port, link, "flower-superlink", group.log_path("superlink"))
        nodes = []
        for c, name, port in zip(s.clients, names, node_ports):
            node_security = ["--insecure"]
            if tls is not None:
                key = make_node_key(home / "keys", name)
                register(commands["flwr"], env, key.public, name)
                node_security = ["--root-certificates", str(tls.ca), "--auth-supernode-private-key",
                                 str(key.private)]
            nodes.append(f"supernode-{name}")
            group.start(nodes[-1], [commands["flower-supernode"], *node_security, "--superlink",
                                    f"{HOST}:{link_port}", "--host", HOST, "--port", str(port),
                                    "--node-config", toml_pairs({"data": c, "name": name})])
        emit({"event": "started", "clients": names, "superlink": f"{HOST}:{link_port}",
              "tls": tls is not None, "ca": str(tls.ca) if tls else None, "resume_round": first})

        run_config = {**s.client_settings().to_run_config(), "num-clients": len(s.clients), "out-dir": str(out),
                      "valid": s.valid or "", "memory-budget-mb": float(s.memory_budget_mb or 0),
                      "max-update-norm": float(s.max_update_norm or 0), "min-fraction": float(s.min_fraction),
                      "round-timeout": float(s.round_timeout), "join-timeout": float(s.join_timeout),
                      "resume-round": first}
        runner = group.start("flwr-run", [commands["flwr"], "run", str(app_dir), CONNECTION, "--stream",
                                          "--run-config", toml_pairs(run_config)], capture=True)
        error = follow_run(group, runner, "superlink", nodes, note)
    finally:
        group.stop()
        shutil.rmtree(home, ignore_errors=True)
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    summary_path = out / SUMMARY
    if not summary_path.is_file():
        why = error or f"it ended without a summary; last output: {last_line(log_dir / 'flwr-run.log')}"
        raise MespError(f"the federated run failed: {why} (logs: {log_dir})")
    summary = json.loads(summary_path.read_text())
    return FederationResult(out=str(out), rounds=summary["rounds"], valid_loss=summary.get("valid_loss"),
                            seconds=time.perf_counter() - started, ports=used, events=events)


def register(flwr: str, env: dict, public_key: Path, name: str) -> None:
    """Register a SuperNode's public key with the SuperLink (Flower's CLI-managed SuperNode authentication)."""
    done = subprocess.run([flwr, "supernode", "register", str(public_key), CONNECTION, "--name", name], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        lines = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.strip()]
        raise MespError(f"flwr supernode register {name}: {lines[-1] if lines else done.returncode}")


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt


class LogWatch:
    """New lines of a growing log file, read from where the last call stopped."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def new_lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        return data[:end].decode("utf-8", errors="replace").splitlines()


def follow_run(group: ProcessGroup, runner: subprocess.Popen, link: str, nodes: list[str], emit) -> str | None:
    """Forward the ServerApp's progress from `flwr run --stream` into emit and its log, until it ends. Meanwhile
    a dead SuperLink ends the run; a SuperNode that exits is a dropout (reported once, the run goes on), and
    a SuperNode the SuperLink refuses is reported. Returns the run's error, if any."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=read_lines, args=(runner.stdout, lines), daemon=True).start()
    error = None
    gone: set[str] = set()
    link_log = LogWatch(group.log_path(link))

    def watch() -> str | None:
        for line in link_log.new_lines():
            if REFUSED_MARK in line:
                emit({"event": "refused", "message": "the SuperLink refused a SuperNode whose public key is not "
                                                     "registered"})
        for name in nodes:
            if name not in gone and (why := group.died([name])):
                gone.add(name)
                emit({"event": "dropout", "client": name.removeprefix("supernode-"), "message": why})
        return group.died([link])

    with open(group.log_path("flwr-run"), "a") as run_log:
        while True:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                dead = watch()
                if dead:
                    return error or dead
                continue
            if line is None:
                break
            run_log.write(line)
            run_log.flush()
            at = line.find(PROGRESS_MARK)
            if at < 0:
                continue
            try:
                event = json.loads(line[at + len(PROGRESS_MARK):])
            except json.JSONDecodeError:
                continue
            if event.get("event") == "error":
                error = event.get("message")
            emit(event)
            if event.get("event") in ("done", "error"):
                break
    watch()
    try:
        runner.wait(timeout=STOP_GRACE)  # the stream ends with the run; stop() ends it otherwise
    except subprocess.TimeoutExpired:
        pass
    return error or (None if runner.returncode == 0 else last_line(group.log_path("flwr-run")))
