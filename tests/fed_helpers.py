"""Helpers of the tests that run real Flower processes (tests/test_federated*.py): client files of random
token ids, the live processes a test's federations left, and an app directory whose ClientApp is the test's
fault injector (tests/faulty_client.py)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

from mesp.federated import APP_DIR
from mesp.federated.processes import TAG_VARIABLE

TEST_MARK = "MESP_TEST_FEDERATION"  # set per test (the `marked` fixture); every process a launcher starts inherits it
WEIGHTS = "adapter_model.safetensors"


def write_client_files(directory: Path, vocab_size: int, sizes: dict[str, int], length: int = 10,
                       seed: int = 0) -> dict[str, str]:
    """name -> path of a JSONL file of `sizes[name]` samples of `length` random token ids."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    files = {}
    for name, n in sizes.items():
        p = directory / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"input_ids": [rng.randrange(vocab_size) for _ in range(length)]}) + "\n"
                             for _ in range(n)))
        files[name] = str(p)
    return files


def federation_processes() -> list[int]:
    """Live processes (other than this one) started under this test's mark, with a launcher's tag."""
    mark = f"{TEST_MARK}={os.environ[TEST_MARK]}".encode()
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if mark in env and any(v.startswith(TAG_VARIABLE.encode() + b"=") for v in env):
            pids.append(int(entry.name))
    return [p for p in pids if p != os.getpid()]


def supernode_of(client: str) -> int | None:
    """The pid of this test's SuperNode serving `client` (its node config names it), or None."""
    needle = f'name="{client}"'.encode()
    for pid in federation_processes():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"flower-supernode") for a in argv[:2]) and any(needle in a for a in argv):
            return pid
    return None


def faulty_app_dir(directory: Path) -> Path:
    """A copy of mesp's Flower app whose ClientApp is tests/faulty_client.py (mesp's ServerApp unchanged)."""
    app = directory / "faulty-app"
    shutil.copytree(APP_DIR, app, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(Path(__file__).with_name("faulty_client.py"), app / "faulty_client.py")
    toml = app / "pyproject.toml"
    text, n = re.subn(r'^clientapp = ".*"$', 'clientapp = "faulty_client:app"', toml.read_text(), flags=re.M)
    assert n == 1, "the app's pyproject.toml has no clientapp line to replace"
    toml.write_text(text)
    return app
