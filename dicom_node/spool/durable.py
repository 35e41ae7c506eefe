"""Making writes durable: fsync of a file, a folder or a tree, syncfs(2), writev with short
writes resumed, and one sync shared by every writer that finished before it (group commit).
The one place the spool, its log and the outbox take these from."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file in `folder` and the folder itself (results in the outbox)."""
    for p in folder.iterdir():
        if p.is_file():
            fsync_path(p)
    fsync_dir(folder)


def write_all(fd: int, parts: Sequence[bytes]) -> None:
    """Write `parts` one after the other at the file's position (writev, short writes resumed)."""
    views = [memoryview(p) for p in parts if len(p)]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]


class GroupSync:
    """Run `sync_fn` once for every caller whose write finished before the call started."""

    def __init__(self, sync_fn: Callable[[], None]):
        self._sync_fn = sync_fn
        self._cond = threading.Condition()
        self._requested = 0
        self._done = 0
        self._running = False

    def sync(self) -> None:
        with self._cond:
            self._requested += 1
            mine = self._requested
            while True:
                if self._done >= mine:
                    return
                if not self._running:
                    self._running = True
                    target = self._requested
                    break
                self._cond.wait()
        ok = False
        try:
            self._sync_fn()
            ok = True
        finally:
            with self._cond:
                self._running = False
                if ok:
                    self._done = max(self._done, target)
                self._cond.notify_all()


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def syncfs(fd: int) -> None:
    """syncfs(2) of the file system holding `fd` (Linux); os.sync() where libc lacks it."""
    fn = getattr(_libc, "syncfs", None)
    if fn is None:
        os.sync()
        return
    if fn(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs failed: {os.strerror(err)}")
