"""Atomic writes of files and folders, with the modes the umask implies.

`tempfile.mkstemp` and `mkdtemp` make a 0600 file and a 0700 folder whatever the umask, so a file
or model folder written through them and renamed into place stayed private even under umask
0022: a model trained by one user could not be read by a service running as another. Everything
written here gets what a plain `open()` / `mkdir()` would give: 0o666 / 0o777 less the umask.

A file goes to a temporary sibling `.NAME.XXXXXXXX`, is fsynced, renamed over NAME (os.replace)
and the folder fsynced, so a crash leaves the old file or the new one, never a part of one (and at
worst a stray temporary sibling). A folder is filled as a temporary sibling `.NAME.tmp-XXXXXXXX`
(`atomic_dir`), fsynced, then renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_dir",
    "file_mode",
    "folder_mode",
    "fsync_dir",
    "umask",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]

_PROC_STATUS = "/proc/self/status"


def umask() -> int:
    """The process's umask, read without changing it.

    `os.umask` is read only by setting it, and a set-then-restore lets any file another thread
    creates meanwhile get the temporary mask (the service is multithreaded). Linux (4.7 and
    later) shows the umask in /proc/self/status; elsewhere a probe folder made with mode 0o777
    shows which bits it takes away. Read at every call: a process may change its umask, and
    the read costs microseconds next to the fsyncs of a write.
    """
    try:
        with open(_PROC_STATUS, "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with tempfile.TemporaryDirectory() as parent:
        probe = os.path.join(parent, "probe")
        os.mkdir(probe, 0o777)
        return 0o777 & ~stat.S_IMODE(os.stat(probe).st_mode)


def file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0o666 less the umask."""
    return 0o666 & ~umask()


def folder_mode() -> int:
    """The mode `os.mkdir(path)` gives a new folder: 0o777 less the umask."""
    return 0o777 & ~umask()


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Replace `path` with `data` atomically (creating its parent folders); returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())  # mkstemp makes it 0600
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Replace `path` with `text` (UTF-8) atomically; see `write_bytes_atomic`."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Replace `path` with `data` as JSON (indent 2, a final newline) atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def atomic_dir(
    path: str | Path, replace: Callable[[Path, Path], None] = os.replace
) -> Iterator[Path]:
    """Fill a new folder, then put it at `path` in one step.

    Yields an empty temporary sibling `.NAME.tmp-XXXXXXXX` with the mode the umask implies. When
    the block ends, every file in it and the folder itself are fsynced, `replace(tmp, path)` puts
    it in place and the parent is fsynced. os.replace needs `path` to be missing or an empty
    folder; a caller replacing a full one passes its own `replace` (captioner.checkpoint swaps
    the two atomically). If the block raises, the temporary folder is deleted and `path` left
    as it was; a kill leaves it behind, for the caller to delete (`.NAME.tmp-*`) before its
    next write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        os.chmod(tmp, folder_mode())  # mkdtemp makes it 0700
        yield tmp
        for folder, _, names in os.walk(tmp):
            for name in names:
                _fsync_file(os.path.join(folder, name))
            fsync_dir(folder)
        replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: str | Path) -> None:
    """Make the names in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(file: str) -> None:
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(file, flags)
    except OSError:  # a symlink, or a socket: nothing of ours to flush
        return
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fsync(fd)
    finally:
        os.close(fd)
