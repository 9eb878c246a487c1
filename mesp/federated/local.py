"""`mesp federated`: a whole Flower federation on this machine, on 127.0.0.1, for one run.

    result = run_local_federation(FederationSettings(model="smollm2-135m-instruct",
                                                     clients=["a.jsonl", "b.jsonl"], rounds=3, local_steps=10,
                                                     out="runs/fed"), progress=print)

It validates every client file first (a malformed one is a MespError naming it, before any process starts),
picks free ports (each bind-tested; an occupied one is skipped), makes a private Flower home (FLWR_HOME) with
one SuperLink connection, starts one SuperLink and one SuperNode per client file (node config: the file and
its stem as the client's name), runs the mesp app (mesp.federated.APP_DIR) with `flwr run --stream`, and
forwards the ServerApp's progress. Every process it starts runs in its own process group and carries a tag
in its environment; on success, failure or Ctrl-C all of them are stopped (SIGTERM, then SIGKILL), any tagged
straggler too, and the Flower home is removed. Flower's own logs stay in OUT/logs/.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..data import check_jsonl, read_jsonl
from ..errors import MespError
from . import APP_DIR, PROGRESS_MARK, SUMMARY
from .local_training import ClientSettings

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
TAG_VARIABLE = "MESP_FEDERATION_TAG"  # set in every process the launcher starts, inherited by their children
READY_TIMEOUT = 60.0  # seconds for the SuperLink to accept connections
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL
CONNECTION = "mesp-local"


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

    def client_settings(self) -> ClientSettings:
        return ClientSettings(model=self.model, steps=self.local_steps, rounds=self.rounds, method=self.method,
                              rank=self.rank, alpha=self.alpha, lr=self.lr, batch_size=self.batch_size,
                              seq_len=self.seq_len, warmup=self.warmup, seed=self.seed)


@dataclass
class FederationResult:
    out: str
    rounds: list[dict]  # per round: train_loss and each client's metrics (summary.json)
    valid_loss: dict | None
    seconds: float
    ports: dict = field(default_factory=dict)  # role -> port used


# ---- checks before any process starts ------------------------------------------------------------------

def client_name(path: str) -> str:
    return Path(path).stem


def check_client_files(paths: list[str]) -> None:
    """Every client file exists and each line is a sample in a format mesp trains on (mesp.data.check_jsonl,
    no tokenizer needed); the names are distinct."""
    if not paths:
        raise MespError("--clients: give at least one JSONL file")
    seen: dict[str, str] = {}
    for p in paths:
        name = client_name(p)
        if name in seen:
            raise MespError(f"--clients: {seen[name]} and {p} share the client name {name!r} (the file stem)")
        seen[name] = p
        check_jsonl(p)
        if next(read_jsonl(p), None) is None:
            raise MespError(f"{p}: no samples (the file is empty)")


def check_settings(s: FederationSettings) -> None:
    for name in ("rounds", "local_steps"):
        v = getattr(s, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise MespError(f"--{name.replace('_', '-')}: must be a positive integer, got {v!r}")
    if s.memory_budget_mb is not None and not s.memory_budget_mb > 0:
        raise MespError(f"--memory-budget: must be a positive number of MiB, got {s.memory_budget_mb!r}")
    if s.port is not None and not 1024 <= s.port <= 65535:
        raise MespError(f"--port: must be in 1024..65535, got {s.port}")
    s.client_settings().train_config(os.devnull)  # method, rank, lr ... checked by mesp train's rules
    out = Path(s.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MespError(f"--out: {out} exists and is not an empty directory")
    if s.valid:
        check_jsonl(s.valid)
    check_client_files(s.clients)


def executable(name: str) -> str:
    """A Flower command from this Python's environment (else PATH)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise MespError(f"{name}: not found; install Flower with: pip install 'mesp[federated]'")
    return found


# ---- ports ---------------------------------------------------------------------------------------------

def port_is_free(port: int, host: str = HOST) -> bool:
    """Whether a server could listen on host:port now. SO_REUSEADDR as servers set it: connections of a finished
    run lingering in TIME_WAIT do not hold a port, a listening socket does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(n: int, start: int | None = None, host: str = HOST) -> list[int]:
    """n distinct ports that bind now: from `start` upwards, skipping occupied ones, or (start None) ports the
    kernel hands out, held together so they differ."""
    if start is not None:
        ports = [p for p in range(start, 65536) if port_is_free(p, host)][:n]
        if len(ports) < n:
            raise MespError(f"--port: fewer than {n} free ports from {start} upwards")
        return ports
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(s)
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_until_listening(port: int, process: subprocess.Popen, what: str, log_path: Path,
                         timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise MespError(f"{what} exited with status {process.returncode}: {last_line(log_path)}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.1)
    raise MespError(f"{what} did not accept connections on {HOST}:{port} within {timeout:.0f} s (see {log_path})")


def last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(no output)"


# ---- processes -----------------------------------------------------------------------------------------

def tagged_processes(tag: str) -> list[int]:
    """Pids of live processes whose environment carries TAG_VARIABLE=tag (Linux /proc; [] elsewhere)."""
    needle = f"{TAG_VARIABLE}={tag}".encode()
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return pids


class ProcessGroup:
    """The processes of one federation: each started in its own session, all stopped together."""

    def __init__(self, env: dict, log_dir: Path, tag: str):
        self.env, self.log_dir, self.tag = env, log_dir, tag
        self.processes: dict[str, subprocess.Popen] = {}
        self._logs = []

    def start(self, name: str, argv: list[str], capture: bool = False) -> subprocess.Popen:
        log_file = open(self.log_dir / f"{name}.log", "wb")
        self._logs.append(log_file)
        p = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE if capture else log_file,
                             stderr=subprocess.STDOUT if capture else log_file, start_new_session=True)
        self.processes[name] = p
        return p

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def died(self, names) -> str | None:
        for name in names:
            p = self.processes[name]
            if p.poll() is not None:
                return f"{name} exited with status {p.returncode}: {last_line(self.log_path(name))}"
        return None

    def stop(self) -> None:
        """SIGTERM every group, SIGKILL what is left after STOP_GRACE, then any tagged straggler."""
        for p in self.processes.values():
            signal_group(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for p in self.processes.values():
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.processes.values():
            signal_group(p.pid, signal.SIGKILL)  # the group may outlive its leader
            p.wait()
        # stragglers: Flower starts some helpers in sessions of their own; one may be starting another as we
        # look, so look again until none is left (a killed process leaves /proc once it is gone)
        deadline = time.monotonic() + STOP_GRACE
        while (left := tagged_processes(self.tag)) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.05)
        for f in self._logs:
            f.close()


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def toml_pairs(config: dict) -> str:
    """A run config as `flwr run --run-config` takes it: space-separated TOML key=value pairs."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())


def read_lines(stream, into: queue.Queue) -> None:
    for raw in iter(stream.readline, b""):
        into.put(raw.decode("utf-8", errors="replace"))
    into.put(None)


# ---- the run -------------------------------------------------------------------------------------------

def run_local_federation(s: FederationSettings, progress: Callable[[dict], None] | None = None
                         ) -> FederationResult:
    """Run the federation (see the module docstring). progress(event) receives {"event": "ports", ...},
    {"event": "started", ...} and the ServerApp's events ("start", "round", "eval", "done")."""
    emit = progress or (lambda event: None)
    started = time.perf_counter()
    s.clients = [os.path.abspath(c) for c in s.clients]
    s.valid = os.path.abspath(s.valid) if s.valid else None
    check_settings(s)
    commands = {name: executable(name) for name in ("flower-superlink", "flower-supernode", "flwr")}
    out = Path(s.out).resolve()
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="mesp-flwr-home-"))
    tag = uuid.uuid4().hex
    mesp_root = str(Path(__file__).resolve().parents[2])  # so every Flower process imports this mesp
    # Flower starts its helpers (flower-superexec ...) by name: the directory of the commands found comes first
    bin_dirs = list(dict.fromkeys(str(Path(c).parent) for c in commands.values()))
    env = {**os.environ, "FLWR_HOME": str(home), TAG_VARIABLE: tag,
           "PATH": os.pathsep.join(bin_dirs + [os.environ.get("PATH", "")]),
           "PYTHONPATH": os.pathsep.join(filter(None, [mesp_root, os.environ.get("PYTHONPATH")]))}
    group = ProcessGroup(env, log_dir, tag)
    previous_term = None
    if threading.current_thread() is threading.main_thread():  # a SIGTERM to us stops the federation too
        previous_term = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        ports = free_ports(1 + len(s.clients), s.port)
        link_port, node_ports = ports[0], ports[1:]
        used = {"superlink": link_port, **{client_name(c): p for c, p in zip(s.clients, node_ports)}}
        emit({"event": "ports", "ports": used})
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{HOST}:{link_port}"\ninsecure = true\n')
        app_dir = home / "app"
        shutil.copytree(APP_DIR, app_dir, ignore=shutil.ignore_patterns("__pycache__"))

        link = group.start("superlink", [commands["flower-superlink"], "--insecure", "--host", HOST, "--port",
                                         str(link_port), "--disable-runtime-dependency-installation"])
        wait_until_listening(link_port, link, "flower-superlink", group.log_path("superlink"))
        nodes = []
        for c, port in zip(s.clients, node_ports):
            name = f"supernode-{client_name(c)}"
            nodes.append(name)
            group.start(name, [commands["flower-supernode"], "--insecure", "--superlink", f"{HOST}:{link_port}",
                               "--host", HOST, "--port", str(port),
                               "--node-config", toml_pairs({"data": c, "name": client_name(c)})])
        emit({"event": "started", "clients": [client_name(c) for c in s.clients]})

        run_config = {**s.client_settings().to_run_config(), "num-clients": len(s.clients), "out-dir": str(out),
                      "valid": s.valid or "", "memory-budget-mb": float(s.memory_budget_mb or 0)}
        runner = group.start("flwr-run", [commands["flwr"], "run", str(app_dir), CONNECTION, "--stream",
                                          "--run-config", toml_pairs(run_config)], capture=True)
        error = follow_run(group, runner, ["superlink", *nodes], emit)
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
                            seconds=time.perf_counter() - started, ports=used)


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def follow_run(group: ProcessGroup, runner: subprocess.Popen, servers: list[str], emit) -> str | None:
    """Forward the ServerApp's progress from `flwr run --stream` into emit and its log, until it ends; watch
    the SuperLink and SuperNodes meanwhile (a dead one ends the run). Returns the run's error, if any."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=read_lines, args=(runner.stdout, lines), daemon=True).start()
    error = None
    with open(group.log_path("flwr-run"), "a") as run_log:
        while True:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                dead = group.died(servers)
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
    try:
        runner.wait(timeout=STOP_GRACE)  # the stream ends with the run; stop() ends it otherwise
    except subprocess.TimeoutExpired:
        pass
    return error or (None if runner.returncode == 0 else last_line(group.log_path("flwr-run")))
