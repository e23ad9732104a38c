"""Writing directories atomically, so a crash mid-write never leaves a half-written one."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import Callable, Iterator, Optional

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


class ForeignFilesError(FileExistsError):
    """The target directory holds files this write did not produce; nothing was replaced."""


def _check_target(path: Path) -> None:
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        kind = "a symbolic link" if path.is_symlink() else "a file"
        raise NotADirectoryError(
            f"cannot write the directory {str(path)!r}: that path is {kind}. Remove it or choose another path")


def _foreign(path: Path, new: Path, owns: Optional[Callable[[str], bool]]) -> list[str]:
    """Entries of the existing ``path`` that this write may not replace: those that are neither
    among the new directory's entries nor claimed by ``owns``."""
    made = {p.name for p in new.iterdir()}
    return sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir()
                  if p.name not in made and not (owns is not None and owns(p.name)))


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``folder`` itself (no lock file is left behind), held while
    a target in it is swapped, so concurrent writers take turns."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``), so a reader of
    either never finds it missing. False where the system or file system cannot do it."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name, use_errno=True) if name else None
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, owns: Optional[Callable[[str], bool]] = None) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``path`` to fill.

    On success it takes the place of ``path``; on error it is deleted. Readers see the old
    directory or the complete new one, never a partial one, even under ``kill -9``; what a
    killed writer left beside ``path`` is removed by the next write (``remove_abandoned``).

    An existing ``path`` is replaced only when every entry in it is one the new directory
    also holds, or one ``owns(name)`` claims (a writer's own files whose set may change, such
    as cache shards); otherwise ``ForeignFilesError`` is raised and nothing is touched, so a
    write never deletes a file it did not make. A ``path`` that is a file is refused before
    anything is written. Concurrent writers to one path take turns at the swap (an ``flock``
    on the parent folder): the last one wins and no work directory is left behind. Where
    the system allows, the swap is one ``renameat2(RENAME_EXCHANGE)``, so ``path`` is never
    missing, even for an instant.
    """
    path = Path(path)
    _check_target(path)
    tmp = work_directory(path)
    try:
        yield tmp
        with _locked(path.parent):
            _check_target(path)
            if path.exists():
                foreign = _foreign(path, tmp, owns)
                if foreign:
                    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
                    raise ForeignFilesError(
                        f"refusing to replace {str(path)!r}: it holds files this write did not make ({shown}). "
                        "Write to a new or empty directory, or move those files away first")
                if _exchange(tmp, path):
                    old = tmp  # now holds the previous directory
                else:
                    old = _new_sibling(path, "old")
                    os.replace(path, old)
                    os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left after a successful rename
