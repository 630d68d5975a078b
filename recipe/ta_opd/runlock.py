"""One run per output folder (both backends): ``<out_dir>/.ta_opd.lock``.

The lock is an exclusive ``flock`` on that file, which the kernel drops when the holder dies (even
by SIGKILL), so liveness never depends on guessing from a pid. The file also records who holds it
(pid, host, start time, command line): a second run is refused with those details, and a file
left behind by a dead run is reported as a stale lock and taken over. A lock recorded by another
host cannot be checked from here (``flock`` is not reliable across NFS hosts): it is refused and
the message says which file to delete if that run is gone. Re-entrant within one process.

The lock file is opened with ``O_NOFOLLOW``: a lock path that is a symbolic link is refused (it
could point at any file, which taking over a "stale" lock would overwrite). The same lock guards
any other folder a run writes (``trainer.rollout_data_dir``): ``key`` names the knob in errors.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from ta_opd.errors import TAConfigError

LOCK_NAME = ".ta_opd.lock"
_held: dict[str, list] = {}  # resolved lock path -> [fd, depth]


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "argv": " ".join(sys.argv)[:300]}


def _describe(info: dict) -> str:
    return (f"pid {info.get('pid')} on host {info.get('host')} (started {info.get('started')}; "
            f"command: {info.get('argv')})")


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 65536)
    try:
        info = json.loads(raw.decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {"garbled": raw[:80].decode(errors="replace")}
    return info if isinstance(info, dict) else {}


def _open(path: Path, key: str, flags: int) -> int:
    """Open the lock file without following a link; a link is refused with the file to delete."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if path.is_symlink():
            raise TAConfigError(f"{key}={path.parent}: its lock file {path} is a symbolic link (to "
                                f"{os.readlink(path)}); a lock is never taken through a link, which would overwrite "
                                f"the file it points to. Delete {path} (the link only) and run again") from None
        raise TAConfigError(f"{key}={path.parent}: its lock file {path} cannot be opened "
                            f"({type(e).__name__}: {e.strerror or e})") from None


def acquire(out_dir: str | Path, log: Callable[[str], None] = print,
            key: str = "trainer.default_local_dir") -> Path:
    """Take the lock on ``out_dir`` (created if needed) or raise TAConfigError naming the holder;
    ``key`` is the knob that names the folder."""
    path = Path(out_dir).expanduser().resolve() / LOCK_NAME
    held = str(path)
    if held in _held:
        _held[held][1] += 1
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = _open(path, key, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read(fd)
            os.close(fd)
            raise TAConfigError(
                f"{key}={path.parent} is in use by another run: {_describe(info)}. Wait for it "
                f"to finish, stop it, or choose another {key}") from None
        except OSError as e:  # e.g. ENOLCK: a file system without flock support
            os.close(fd)
            raise TAConfigError(f"{key}={path.parent} cannot be locked ({type(e).__name__}: {e}); "
                                "choose a folder on a local file system") from None
        # the holder may have unlinked the file between our open and flock: then lock the new one
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        break
    previous = _read(fd)
    if previous.get("host") not in (None, socket.gethostname()):
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        raise TAConfigError(
            f"{key}={path.parent} is locked by a run on another host: {_describe(previous)}. "
            f"Its liveness cannot be checked from {socket.gethostname()}; if that run is gone, delete {path}")
    if previous:
        log(f"[ta-opd] cleared a stale lock on {path.parent}: {_describe(previous)} is no longer running")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(_holder()).encode())
    os.fsync(fd)
    _held[held] = [fd, 1]
    return path


def release(path: Path) -> None:
    key = str(path)
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _held[key]
    fd = entry[0]
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # unlink while still holding the lock; waiters re-check the inode
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextlib.contextmanager
def hold(out_dir: str | Path, log: Callable[[str], None] = print) -> Iterator[Path]:
    path = acquire(out_dir, log)
    try:
        yield path
    finally:
        release(path)


def release_all() -> None:
    """Release every lock this process holds (the entry point calls it when a run ends)."""
    for key in list(_held):
        _held[key][1] = 1
        release(Path(key))


def check_free(out_dir: str | Path, key: str = "trainer.default_local_dir") -> None:
    """Raise TAConfigError if a live run holds ``out_dir``'s lock; creates and changes nothing (the
    dry run's check). A lock file left by a dead run counts as free: a real launch takes it over."""
    path = Path(out_dir).expanduser().resolve() / LOCK_NAME
    if str(path) in _held or not (path.is_file() or path.is_symlink()):
        return
    fd = _open(path, key, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TAConfigError(f"{key}={path.parent} is in use by another run: "
                                f"{_describe(_read(fd))}. Wait for it to finish, stop it, or choose another "
                                f"{key}") from None
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
