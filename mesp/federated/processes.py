"""The processes of a local federation: free ports, and process groups that are stopped together (SIGTERM,
then SIGKILL, then any process still carrying the run's tag in its environment)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from ..errors import MespError

HOST = "127.0.0.1"
TAG_VARIABLE = "MESP_FEDERATION_TAG"  # set in every process the launcher starts, inherited by their children
READY_TIMEOUT = 60.0  # seconds for the SuperLink to accept connections
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL


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
