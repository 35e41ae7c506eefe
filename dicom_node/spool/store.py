"""The spool: received instances as files, written durably before anyone is told "stored".

Layout: ``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``, each file
the instance exactly as received with a DICOM file meta header (Part 10). Temporary files
live in ``<root>/.tmp`` on the same file system, so that the final step is a rename.

A file is durable when its data and its directory entry have reached the disk, or when
the log can write it again (``spool.durability``):
- ``log`` (the default): the instance is appended to the spool's write-ahead log and
  fdatasynced, and acknowledged; the placer thread later copies it out of the log into
  its file and renames it, without a sync, once the receivers pause or a reader asks
  (`settle`); a checkpoint makes the files durable in bulk, and opening the spool
  replays what was not checkpointed (`dicom_node.spool.log`). Instances larger than a log
  segment take the fsync path;
- ``fsync`` (portable POSIX): fsync the temporary file, rename it, fsync the folder;
- ``syncfs`` (Linux): rename, then one ``syncfs`` of the spool file system, shared by
  every writer that finished its rename before the call started (group commit). Cheaper
  when the spool has a file system of its own; slower when other programs write a lot to
  the same one.

UIDs become path components only after `dicom_node.spool.header.check_uid` accepted them:
digits and dots, at most 64 characters, so no name can leave the spool.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

from dicom_node.spool.durable import GroupSync, fsync_dir, fsync_path, syncfs, write_all
from dicom_node.spool.header import InstanceHeader
from dicom_node.spool.log import LOG_DIR, LogUnavailable, SpoolLog

log = logging.getLogger("nodal.spool")

TMP_DIR = ".tmp"


#: What the spool stores: one byte string, or pieces written one after the other.
Data = bytes | Sequence[bytes]


def relative_path(header: InstanceHeader) -> Path:
    """Where an instance lives under the spool root; all three parts are checked UIDs."""
    return Path(header.study_instance_uid) / header.series_instance_uid / f"{header.sop_instance_uid}.dcm"


class Spool:
    """Durable instance files under `root`."""

    def __init__(
        self,
        root: Path,
        durability: Literal["log", "fsync", "syncfs"] = "fsync",
        log_segment_bytes: int = 32 << 20,
    ):
        self.root = Path(root)
        self.tmp = self.root / TMP_DIR
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.durability = durability
        self._root_fd = os.open(self.root, os.O_RDONLY)
        self._group = GroupSync(lambda: syncfs(self._root_fd)) if durability == "syncfs" else None
        self._counter = 0
        self._lock = threading.Lock()
        self._dirs: set[Path] = set()  # folders known to exist durably
        self._log_dirs: set[Path] = set()  # folders made on the log path (durable at checkpoint)
        self.log = SpoolLog(self.root, log_segment_bytes, self._restore) if durability == "log" else None
        self._placer = Placer(self._place, self.log.done, self.log.crowded) if self.log is not None else None

    def close(self) -> None:
        if self._placer is not None:
            self._placer.close()  # what it could not write stays in the log, replayed at start
        if self.log is not None:
            self.log.close()
        os.close(self._root_fd)

    def _restore(self, rel: str, data: bytes) -> None:
        """Replay of a log record whose file was lost: write it the portable durable way
        (`commit` syncs file and folder whenever there is no syncfs group, as in log mode)."""
        self.commit(self.write_temp(data, synced=True), Path(rel), synced=True)

    def temp_path(self) -> Path:
        with self._lock:
            self._counter += 1
            n = self._counter
        return self.tmp / f"{os.getpid()}-{threading.get_ident()}-{n}.part"

    def write_temp(self, data: Data, synced: bool = False) -> Path:
        """Write `data` to a new temporary file (durable only with `synced`)."""
        path = self.temp_path()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            write_all(fd, pieces(data))
            if synced:
                os.fsync(fd)
        finally:
            os.close(fd)
        return path

    def store(self, data: Data, rel: Path) -> Path:
        """Write `data` (bytes, or pieces written one after the other: a file meta prefix
        and the dataset, never joined in memory) durably under `rel`; return the final
        path. In log mode the file itself is written by the placer thread later (`settle`
        waits for it, `placing` tells whether it is still on its way)."""
        if self.log is not None:
            try:
                seq = self.log.append(str(rel), pieces(data))
            except LogUnavailable:
                pass  # too large for a segment, or the log failed: the fsync path below
            else:
                self._placer.put(seq, rel)  # type: ignore[union-attr]
                return self.root / rel
        temp = self.write_temp(data, synced=self._group is None)
        try:
            return self.commit(temp, rel, synced=True)
        except OSError:
            self.discard(temp)
            raise

    def placing(self, rel: Path) -> bool:
        """The instance is durable in the log and its file not yet written."""
        return self._placer is not None and self._placer.holds(rel)

    def unwritten_bytes(self) -> int | None:
        """Bytes acknowledged from the log whose files are not written yet (None without a log)."""
        return None if self.log is None else self.log.unwritten_bytes()

    def settle(self, timeout: float = 30.0) -> bool:
        """Wait until every stored instance's file is written (False on timeout)."""
        return self._placer is None or self._placer.wait_empty(timeout)

    def commit(self, temp: Path, rel: Path, synced: bool = False) -> Path:
        """Make the temporary file `temp` (already fsynced if `synced`) durable under `rel`;
        return the final path."""
        final = self.root / rel
        if self._group is None:
            self._ensure_dir(final.parent)
            if not synced:
                fsync_path(temp)
            try:
                os.replace(temp, final)
            except FileNotFoundError:  # the folder was removed since (retention): make it again
                self._dirs.discard(final.parent)
                self._ensure_dir(final.parent)
                os.replace(temp, final)
            fsync_dir(final.parent)
        else:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp, final)
            self._group.sync()
        return final

    def _place(self, seq: int, rel: Path) -> Path:
        """Write the file of log record `seq` (copied from the log) and rename it, without a
        sync: the record in the log is what makes it durable."""
        temp = self.temp_path()
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                self.log.copy_to(seq, fd)  # type: ignore[union-attr]
            finally:
                os.close(fd)
        except OSError:
            self.discard(temp)
            raise
        final = self.root / rel
        try:
            if final.parent not in self._log_dirs:
                final.parent.mkdir(parents=True, exist_ok=True)
                with self._lock:
                    if len(self._log_dirs) > 10_000:
                        self._log_dirs.clear()
                    self._log_dirs.add(final.parent)
            try:
                os.replace(temp, final)
            except FileNotFoundError:  # the folder was removed since (retention): make it again
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(temp, final)
        except OSError:
            self.discard(temp)
            raise
        return final

    def _ensure_dir(self, folder: Path) -> None:
        """`_ensure_dir`, remembering folders already known to exist durably (no stat per file)."""
        if folder in self._dirs:
            return
        _ensure_dir(folder, self.root)
        with self._lock:
            if len(self._dirs) > 10_000:
                self._dirs.clear()
            self._dirs.add(folder)

    def discard(self, temp: Path) -> None:
        temp.unlink(missing_ok=True)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def clear_temp(self) -> int:
        """Delete what an earlier run left in the temporary folder (never acknowledged)."""
        n = 0
        for p in self.tmp.iterdir():
            p.unlink(missing_ok=True)
            n += 1
        return n

    def files(self) -> Iterator[Path]:
        """Every instance file in the spool (for reconciliation with the index)."""
        for study in self.root.iterdir():
            if study.name in (TMP_DIR, LOG_DIR) or not study.is_dir():
                continue
            for series in study.iterdir():
                if series.is_dir():
                    yield from series.glob("*.dcm")


class Placer:
    """The thread that writes the spool files of instances already durable in the log.

    Acknowledging an instance then costs one append and one fdatasync. Writing its file (a
    new inode, a copy of the record out of the log, a rename) waits until the receivers
    pause (`IDLE_SECONDS` without a new instance), unless someone waits for the files
    (`wait_empty`) or the log fills (`crowded`): on two cores, writing files beside a
    transfer slowed the transfer by a fifth (benchmarks/RESULTS.md). A file that cannot be
    written (disk full) is retried every `RETRY_SECONDS` and its record kept in the log
    until it is, so an acknowledged instance is never lost. Nothing is held in memory: the
    data stays in the log (and, just written, in the page cache)."""

    RETRY_SECONDS = 1.0
    IDLE_SECONDS = 0.2
    LOOK_SECONDS = 0.05  # how often a placer with files to write looks at the clock and the log

    def __init__(self, place, done, crowded=lambda: False):
        self._place, self._done, self._crowded = place, done, crowded
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[int, Path]] = collections.deque()
        self._holding: dict[Path, int] = {}  # rel -> records of it queued or being written
        self._last_put = 0.0
        self._waiters = 0  # callers of wait_empty: write now
        self._submitted = self._finished = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="spool-placer", daemon=True)
        self._thread.start()

    def put(self, seq: int, rel: Path) -> None:
        with self._cond:
            self._queue.append((seq, rel))
            self._holding[rel] = self._holding.get(rel, 0) + 1
            self._submitted += 1
            self._last_put = time.monotonic()
            if len(self._queue) == 1:  # else the thread is already counting the idle time down
                self._cond.notify_all()

    def holds(self, rel: Path) -> bool:
        with self._cond:
            return rel in self._holding

    def wait_empty(self, timeout: float) -> bool:
        """Wait until every file queued before this call is written."""
        deadline = time.monotonic() + timeout
        with self._cond:
            goal = self._submitted
            self._waiters += 1
            self._cond.notify_all()
            try:
                while self._finished < goal:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._cond.wait(min(left, 0.1))
            finally:
                self._waiters -= 1
        return True

    def close(self, timeout: float = 30.0) -> None:
        self.wait_empty(timeout)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(5)

    def _due(self) -> bool:
        """Write the next file now (called holding the condition, with a non-empty queue)."""
        return (
            bool(self._waiters) or time.monotonic() - self._last_put >= self.IDLE_SECONDS or self._crowded()
        )

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not (self._queue and self._due()):
                    self._cond.wait(self.LOOK_SECONDS if self._queue else None)
                if self._stop:
                    return
                seq, rel = self._queue[0]
            if not self._write(seq, rel):
                return  # stopping: the record stays in the log
            self._done(seq)
            with self._cond:
                self._queue.popleft()
                left = self._holding[rel] - 1
                if left:
                    self._holding[rel] = left
                else:
                    del self._holding[rel]
                self._finished += 1
                self._cond.notify_all()

    def _write(self, seq: int, rel: Path) -> bool:
        while True:
            try:
                self._place(seq, rel)
                return True
            except OSError as e:
                log.error(
                    "could not write a spool file (%s); it is safe in the spool log, retrying",
                    e.strerror or type(e).__name__,
                )
            with self._cond:
                if self._cond.wait_for(lambda: self._stop, self.RETRY_SECONDS):
                    return False


def pieces(data: Data) -> tuple[bytes, ...]:
    return (data,) if isinstance(data, bytes | bytearray | memoryview) else tuple(data)  # type: ignore[return-value]


def _ensure_dir(folder: Path, root: Path) -> None:
    """Create `folder` (and missing parents below `root`), each new entry made durable."""
    if folder.is_dir() or folder == root:
        return
    _ensure_dir(folder.parent, root)
    try:
        folder.mkdir()
    except FileExistsError:
        return
    fsync_dir(folder.parent)
