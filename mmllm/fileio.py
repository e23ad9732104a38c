"""Writing directories atomically, so a crash mid-write never leaves a half-written one."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import Iterator

# Work directories beside a target are named ``.<target>.<kind>-<host>.<pid>-<random>``, so
# that the ones a killed process left behind can be told from the ones a live one is filling.
KINDS = ("tmp", "old")


def _owner() -> str:
    return f"{socket.gethostname()}.{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_abandoned(path: str | os.PathLike) -> list[Path]:
    """Delete the work directories beside ``path`` that a process on this host left behind when
    it was killed (``kill -9``, a power cut) and that no live process owns. Names from another
    host, or without an owner (written before owners were recorded), are left alone.
    Returns what was removed."""
    path = Path(path)
    host = socket.gethostname()
    removed = []
    if not path.parent.is_dir():
        return removed
    for entry in path.parent.iterdir():
        for kind in KINDS:
            prefix = f".{path.name}.{kind}-"
            if not entry.name.startswith(prefix):
                continue
            owner_host, _, pid = entry.name[len(prefix):].rsplit("-", 1)[0].rpartition(".")
            if owner_host == host and pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def work_directory(path: str | os.PathLike, kind: str = "tmp") -> Path:
    """A new empty directory beside ``path`` to fill and later rename onto it, made after
    clearing what killed processes left there (``remove_abandoned``). Its mode follows the
    umask, so the renamed result is as readable as any directory the user makes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(path)
    return _new_sibling(path, kind)


def _new_sibling(path: Path, kind: str) -> Path:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    while True:  # os.mkdir, not tempfile.mkdtemp: the directory gets the umask's mode, not 0700
        work = path.parent / f".{path.name}.{kind}-{_owner()}-{secrets.token_hex(4)}"
        try:
            work.mkdir()
            return work
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``path`` to fill.

    On success it is renamed to ``path`` (an existing ``path`` is swapped out, then removed);
    on error it is deleted. Readers see the old directory or the complete new one, never a
    partial one, even under ``kill -9``; what a killed writer left beside ``path`` is removed
    by the next write (``remove_abandoned``).
    """
    path = Path(path)
    tmp = work_directory(path)
    try:
        yield tmp
        if path.exists():
            old = _new_sibling(path, "old")  # the parent was cleared when tmp was made
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left after a successful rename
