"""Atomic, durable writes: a crash, a bad step or a power cut never leaves a half-written file where a good one
was, and what mesp writes carries the permissions the user's umask asks for.

Format writers (mesp.formats.safetensors.write_safetensors) build on atomic_write; directories written as a whole
(merged models, checkpoints) are built under temp_dir and put in place with os.replace, then fsync_dir."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .errors import MespError, one_line


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (os.umask can only be read by setting it,
    which races with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename or creation inside `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_dir(parent: Path, name: str, suffix: str = ".tmp") -> Path:
    """A new hidden directory `.NAME.XXXX.tmp` in `parent`, with the mode a plain mkdir would give it (mkdtemp's
    is 0700) so the directory it becomes carries the user's umask."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=suffix, dir=parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(tmp_path), then make tmp_path durable and rename it over `path` (same directory, so the rename is
    atomic). The file gets the mode a plain open() would give it (mkstemp's is 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def open_for_reading(path) -> tuple:
    """(binary file object, size in bytes) of `path`, for a reader that checks a header against the size before
    reading it; a one-line MespError naming the file when it cannot be opened."""
    try:
        size = os.path.getsize(path)
        return open(path, "rb"), size
    except OSError as e:
        raise MespError(f"{path}: cannot read ({one_line(e)})") from e


def write_json(path, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
    atomic_write(path, write)


def write_text(path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
