"""The spool's write-ahead log: one data-only sync per acknowledged instance.

With ``spool.durability: log`` an instance is durable once its bytes are
appended to a log segment whose blocks were written at start-up, and ``fdatasync`` has
returned. That sync moves data only: no new inode, no block allocation, no folder entry,
where an fsync of a new file and of its folder makes the file system commit its journal
twice. The spool file is then written and renamed as in the other modes, but not synced,
and not while instances arrive (the spool's placer thread copies the record out of the
log once the receivers pause, a reader waits, or the log is half full): a checkpoint
thread makes the spool durable in bulk (one ``syncfs`` of its file system after a segment
fills, or after a quiet moment) and then records the last sequence number whose file is
durable. Opening the spool replays the log: every record after the
checkpoint whose file is missing or differs is written again, durably. An instance that
was acknowledged is therefore in the spool after a crash or a power cut.

Layout: ``<spool>/.log/segment-<n>`` (`SEGMENTS` files of ``spool.log_segment_mb``,
written with zeros once) and ``<spool>/.log/checkpoint`` (8 bytes). A record is a header
(`HEAD`: magic, sequence number, path length, data length, CRC-32 of path and data,
CRC-32 of the header; zlib's CRC-32, computed with ISA-L), the path relative to the spool
root, and the data. Writers append under one lock in sequence order, so within a segment
an acknowledged record never follows a hole; they share their fdatasyncs (group commit).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from isal.isal_zlib import crc32

from dicom_node.spool.durable import GroupSync, fsync_dir, syncfs, write_all
from dicom_node.spool.header import UID_PATTERN

log = logging.getLogger("nodal.spool")

LOG_DIR = ".log"
SEGMENTS = 4
MAGIC = b"NLG1"
HEAD = struct.Struct("<4sQHQII")  # magic, seq, path length, data length, body CRC, header CRC
#: A checkpoint follows this long after the last append when no segment filled before.
IDLE_CHECKPOINT_S = 0.5
#: `<study>/<series>/<sop>.dcm`, each a checked UID: the only paths a record may name.
_REL_RE = re.compile(rf"^{UID_PATTERN}/{UID_PATTERN}/{UID_PATTERN}\.dcm$")


class LogUnavailable(Exception):
    """The log cannot take this record (too large, or the log failed): use the fsync path."""


class SpoolLog:
    """Append-and-sync log under ``<spool root>/.log``; see the module docstring."""

    def __init__(
        self,
        root: Path,
        segment_bytes: int,
        restore: Callable[[str, bytes], None],
    ):
        """Open (create) the segments and replay what the last run did not checkpoint;
        `restore(rel, data)` writes one spool file durably."""
        self.root = Path(root)
        self.dir = self.root / LOG_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:  # one writer per log: a second nodal on the same data folder is refused
            fcntl.flock(self._root_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._root_fd)
            raise RuntimeError(f"the spool {self.root} is in use by another nodal process") from None
        self._fds = [self._open_segment(i) for i in range(SEGMENTS)]
        self._syncs = [GroupSync(lambda fd=fd: os.fdatasync(fd)) for fd in self._fds]  # type: ignore[misc]
        self._cond = threading.Condition()
        self.restored, last_seq = self._replay(restore)
        self._sync_spool()
        self._write_checkpoint(last_seq)
        self._checkpointed = last_seq
        self._seq = last_seq
        self._segment, self._offset = 0, 0
        self._segment_last = [0] * SEGMENTS  # highest sequence number in each segment's pass
        self._in_flight: dict[int, tuple[int, int, int]] = {}  # seq -> (fd, data offset, length)
        self._in_flight_bytes = 0  # spool file not yet written
        self._writer_waits = False  # a writer waits for a segment to be checkpointed
        self._last_append = 0.0
        self._wanted = False  # a writer waits for a checkpoint
        self._broken = False
        self._stop = False
        self._thread = threading.Thread(target=self._checkpointer, name="spool-checkpoint", daemon=True)
        self._thread.start()

    # appending ---------------------------------------------------------------------------

    def append(self, rel: str, data: Sequence[bytes]) -> int:
        """Make (rel, data) durable in the log (`data`: the file's bytes in one or more
        pieces); return its sequence number. The caller writes the spool file and then
        calls `done(seq)`. Raises `LogUnavailable`."""
        path = rel.encode()
        size = HEAD.size + len(path) + sum(map(len, data))
        if self._broken or size > self.segment_bytes:
            raise LogUnavailable
        body_crc = crc32(path)
        for piece in data:
            body_crc = crc32(piece, body_crc)
        with self._cond:
            if self._offset + size > self.segment_bytes:
                self._next_segment()
            seq = self._seq + 1
            head = HEAD.pack(MAGIC, seq, len(path), size - HEAD.size - len(path), body_crc, 0)
            head = head[:-4] + struct.pack("<I", crc32(head[:-4]))
            fd, offset = self._fds[self._segment], self._offset
            try:
                written = os.pwritev(fd, [head, path, *data], offset)
            except OSError:
                self._fail("could not write to the spool log")
            if written != size:
                self._fail("short write to the spool log")
            self._seq = seq
            self._offset += size
            self._segment_last[self._segment] = seq
            data_len = size - HEAD.size - len(path)
            self._in_flight[seq] = (fd, offset + HEAD.size + len(path), data_len)
            self._in_flight_bytes += data_len
            self._last_append = time.monotonic()
            sync = self._syncs[self._segment]
        try:
            sync.sync()
        except OSError:
            self.done(seq)
            self._fail("fdatasync of the spool log failed")
        return seq

    def done(self, seq: int) -> None:
        """The spool file of record `seq` is written (or will not be: the store failed)."""
        with self._cond:
            where = self._in_flight.pop(seq, None)
            if where is not None:
                self._in_flight_bytes -= where[2]
            self._cond.notify_all()

    def copy_to(self, seq: int, fd: int) -> None:
        """Write the data of in-flight record `seq` to `fd` (a new file), copied by the
        kernel from the log segment (`copy_file_range`; read and write where that fails)."""
        with self._cond:
            src, offset, length = self._in_flight[seq]
        done = 0
        try:
            while done < length:
                n = os.copy_file_range(src, fd, length - done, offset + done)
                if n == 0:
                    raise OSError("copy_file_range copied nothing")
                done += n
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise
            while done < length:  # no copy_file_range here (old kernel, another file system)
                chunk = os.pread(src, min(length - done, 1 << 20), offset + done)
                if not chunk:
                    raise OSError(errno.EIO, "spool log record shorter than its header says") from None
                write_all(fd, [chunk])
                done += len(chunk)

    def unwritten_bytes(self) -> int:
        with self._cond:
            return self._in_flight_bytes

    def crowded(self) -> bool:
        """Half the log holds records whose files are not written, or a writer waits for space."""
        return self._writer_waits or self._in_flight_bytes * 2 >= SEGMENTS * self.segment_bytes

    def _next_segment(self) -> None:
        """Move to the next segment once every record of its last pass is checkpointed."""
        nxt = (self._segment + 1) % SEGMENTS
        while self._segment_last[nxt] > self._checkpointed and not self._broken:
            self._wanted = self._writer_waits = True
            self._cond.notify_all()
            self._cond.wait(1.0)
        self._writer_waits = False
        if self._broken:
            raise LogUnavailable
        self._segment, self._offset = nxt, 0
        self._wanted = True  # checkpoint the full segment while this one fills
        self._cond.notify_all()

    def _fail(self, what: str) -> None:
        """A write or sync of the log failed: the file system cannot be trusted to hold
        what follows in order, so the spool falls back to the fsync path for good."""
        with self._cond:
            self._broken = True
            self._cond.notify_all()
        log.error("%s; storing with fsync per file from now on", what)
        raise LogUnavailable

    # checkpoints ---------------------------------------------------------------------------

    def _checkpointer(self) -> None:
        while True:
            with self._cond:
                while not self._stop:
                    target = self._durable_target()
                    idle = time.monotonic() - self._last_append >= IDLE_CHECKPOINT_S
                    if target > self._checkpointed and (self._wanted or idle):
                        break
                    self._cond.wait(IDLE_CHECKPOINT_S / 2)
                if self._stop:
                    return
                self._wanted = False
            try:
                self._sync_spool()
                self._write_checkpoint(target)
            except OSError as e:
                log.error("spool checkpoint failed (%s); retrying", e.strerror or type(e).__name__)
                time.sleep(1.0)
                continue
            with self._cond:
                self._checkpointed = max(self._checkpointed, target)
                self._cond.notify_all()

    def _durable_target(self) -> int:
        """The highest sequence number whose record and every earlier one have their spool
        file written (so a sync of the spool now makes them durable)."""
        return min(self._in_flight) - 1 if self._in_flight else self._seq

    def checkpoint(self, timeout: float = 30.0) -> bool:
        """Wait until everything appended so far is checkpointed (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            goal = self._seq
            while self._checkpointed < goal:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wanted = True  # again after each partial checkpoint (files still being written)
                self._cond.notify_all()
                self._cond.wait(min(left, 0.1))
        return True

    def close(self, checkpoint: bool = True) -> None:
        if checkpoint:
            self.checkpoint()
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(10)
        for fd in (*self._fds, self._root_fd):
            os.close(fd)

    def _sync_spool(self) -> None:
        syncfs(self._root_fd)

    def _write_checkpoint(self, seq: int) -> None:
        tmp = self.dir / "checkpoint.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, struct.pack("<Q", seq))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.dir / "checkpoint")
        fsync_dir(self.dir)

    def _read_checkpoint(self) -> int:
        try:
            raw = (self.dir / "checkpoint").read_bytes()
        except FileNotFoundError:
            return 0
        return struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0

    # opening and replay ----------------------------------------------------------------------

    def _open_segment(self, n: int) -> int:
        """Open segment `n`, first writing it full of zeros when it is new (or resized)."""
        path = self.dir / f"segment-{n}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
        if os.fstat(fd).st_size != self.segment_bytes:
            os.ftruncate(fd, 0)
            zeros = bytes(1 << 20)
            left = self.segment_bytes
            while left > 0:
                left -= os.write(fd, zeros[: min(left, len(zeros))])
            os.fsync(fd)
            fsync_dir(self.dir)
        return fd

    def _replay(self, restore: Callable[[str, bytes], None]) -> tuple[int, int]:
        """Write again every record after the checkpoint whose spool file is missing or
        differs; return (files restored, highest sequence number seen)."""
        checkpoint = self._read_checkpoint()
        last, pending = checkpoint, []
        for fd in self._fds:
            for seq, offset, path_len, data_len, body_crc in _records(fd, self.segment_bytes):
                last = max(last, seq)
                if seq > checkpoint:
                    pending.append((seq, fd, offset, path_len, data_len, body_crc))
        restored = 0
        for _seq, fd, offset, path_len, data_len, body_crc in sorted(pending):
            body = os.pread(fd, path_len + data_len, offset + HEAD.size)
            if len(body) != path_len + data_len or crc32(body) != body_crc:
                continue  # torn: its writer never got an acknowledgement
            rel, data = body[:path_len].decode("ascii", "replace"), body[path_len:]
            if not _REL_RE.match(rel) or max(len(p) for p in rel[:-4].split("/")) > 64:
                log.error("spool log record names an unexpected path; skipped")
                continue
            if _same_file(self.root / rel, data):
                continue
            restore(rel, data)
            restored += 1
        if restored:
            log.warning("spool log: %d acknowledged instance(s) written again from the log", restored)
        return restored, last


def _records(fd: int, segment_bytes: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(seq, offset, path length, data length, body CRC) of each well-formed record header
    from the start of a segment, up to the first that is not."""
    offset = 0
    while offset + HEAD.size <= segment_bytes:
        head = os.pread(fd, HEAD.size, offset)
        if len(head) < HEAD.size:
            return
        magic, seq, path_len, data_len, body_crc, head_crc = HEAD.unpack(head)
        if magic != MAGIC or crc32(head[:-4]) != head_crc:
            return
        end = offset + HEAD.size + path_len + data_len
        if end > segment_bytes:
            return
        yield seq, offset, path_len, data_len, body_crc
        offset = end


def _same_file(path: Path, data: bytes) -> bool:
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False
