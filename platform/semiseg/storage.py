"""A grid's storage folder: one driver at a time (a lock file), atomic state writes, and a warning when
others may write the state that `--resume` unpickles.

The lock is an flock on `<storage>/grid.lock`, which holds the holder's pid, host and command. The kernel
releases it when its holder dies, however it dies, so a lock file left by a killed driver never blocks:
the next driver takes it over and says whose it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from trainers.checkpoint import write_text_atomic
from trainers.config import ConfigError

LOCK_FILE = "grid.lock"
log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def hold(storage: Path) -> Iterator[Path]:
    """Hold `<storage>/grid.lock` while inside; one ConfigError naming the lock and its holder when another
    process holds it."""
    storage.mkdir(parents=True, exist_ok=True)
    path = storage / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"{path}: this storage folder is in use by {_describe(_read(fd))}; wait for that grid to "
                "end (or stop it), or give this one another storage"
            ) from None
        _take_over(path, _read(fd))
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_me()) + "\n").encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock; the file stays, naming its last holder


def locked(func: F) -> F:
    """Decorate a function whose first argument is a grid: it runs holding the grid's storage lock."""

    @functools.wraps(func)
    def wrapper(grid: Any, *args: Any, **kwargs: Any) -> Any:
        with hold(grid.storage):
            return func(grid, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _me() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "command": sys.argv}


def _read(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 65536, 0) or b"{}")
    except ValueError:  # written by something else, or cut short: the lock itself still holds
        return {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process (the lock file names no holder)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    command = " ".join(holder.get("command", []))
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {since} (`{command}`)"


def _take_over(path: Path, previous: dict[str, Any]) -> None:
    """Say whose lock this process takes over: a holder that died without releasing it (SIGKILL, a crash)."""
    pid, host = previous.get("pid"), previous.get("host")
    if pid is None or (pid == os.getpid() and host == socket.gethostname()):
        return
    if host == socket.gethostname() and _alive(pid):
        # Alive but not holding the flock: it ended its grid normally and went on with something else.
        return
    where = "no longer running" if host == socket.gethostname() else f"on host {host}, not holding it"
    log.warning("%s: taking over the lock of pid %s (%s)", path, pid, where)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def write_json(path: Path, data: Any) -> None:
    """Write `data` as JSON to `path` atomically: a reader sees the old file or the new one, never a part."""
    write_text_atomic(path, lambda f: (json.dump(data, f, indent=2), f.write("\n")))


def warn_if_shared(*folders: Path) -> None:
    """One warning line for the first of `folders` that group or others may write: `Tuner.restore`
    unpickles what it finds there, so whoever can write it can run code as this user."""
    for folder in (f for f in folders if f.is_dir()):
        mode = folder.stat().st_mode
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            log.warning(
                "%s is writable by group or others (mode %s): --resume unpickles Tune's state from it, "
                "so anyone who can write there can run code as you; `chmod go-w` it",
                folder,
                stat.filemode(mode),
            )
            return
