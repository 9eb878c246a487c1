"""mesp switches PyTorch's transparent-huge-page allocation on before torch loads (mesp/hugepages.py)."""

import subprocess
import sys

import pytest

from mesp import hugepages
from mesp.bench import peers


def mode_file(tmp_path, text):
    path = tmp_path / "enabled"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("mode,expected", [("always [madvise] never\n", True), ("[always] madvise never\n", True),
                                           ("always madvise [never]\n", False)])
def test_set_only_where_the_kernel_takes_madvise(tmp_path, mode, expected):
    env = {}
    assert hugepages.enable_torch_hugepages(env, {}, mode_file(tmp_path, mode)) is expected
    assert env.get(hugepages.VARIABLE) == ("1" if expected else None)


def test_the_users_value_and_an_imported_torch_are_left_alone(tmp_path):
    madvise = mode_file(tmp_path, "always [madvise] never\n")
    env = {hugepages.VARIABLE: "0"}
    assert hugepages.enable_torch_hugepages(env, {}, madvise) is False and env[hugepages.VARIABLE] == "0"
    env = {}
    assert hugepages.enable_torch_hugepages(env, {"torch": object()}, madvise) is False and env == {}
    assert hugepages.enable_torch_hugepages({}, {}, str(tmp_path / "absent")) is False


def anon_huge_kib(env_value):
    """AnonHugePages of a fresh process that imports mesp, then torch, and fills a 64 MiB tensor."""
    code = ("import mesp, torch\n"
            "x = torch.empty(64 << 20, dtype=torch.uint8); x.fill_(1)\n"
            "print(next(l.split()[1] for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')))")
    env = {"PATH": "/usr/bin:/bin"}
    if env_value is not None:
        env[hugepages.VARIABLE] = env_value
    return int(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              check=True).stdout)


@pytest.mark.skipif(not hugepages.kernel_allows_madvise(), reason="the kernel's transparent huge pages are off")
def test_a_large_tensor_lands_on_huge_pages():
    assert anon_huge_kib(None) >= 32 << 10  # most of the 64 MiB in 2 MiB pages
    if "[madvise]" in open(hugepages.THP_MODE).read():  # with THP "always", glibc's mappings get them anyway
        assert anon_huge_kib("0") < 32 << 10


def test_peers_run_without_the_switch_mesp_set(monkeypatch):
    monkeypatch.setattr(hugepages, "set_here", True)
    monkeypatch.setenv(hugepages.VARIABLE, "1")
    assert hugepages.VARIABLE not in peers._child_env(1)
    monkeypatch.setattr(hugepages, "set_here", False)  # the user's own setting goes through
    assert peers._child_env(1)[hugepages.VARIABLE] == "1"
