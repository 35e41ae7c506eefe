"""The spool's write-ahead log (spool.durability: log): what was acknowledged is replayed
after a crash that lost spool files, and nothing else is."""

from __future__ import annotations

import os
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest

from dicom_node.spool import log as spool_log
from dicom_node.spool.log import HEAD, MAGIC
from dicom_node.spool.store import Placer, Spool

MIB = 1 << 20


@pytest.fixture(autouse=True)
def no_idle_checkpoint(monkeypatch):
    """Checkpoints only when a segment fills or a test asks: a crash can then be staged."""
    monkeypatch.setattr(spool_log, "IDLE_CHECKPOINT_S", 3600.0)


def rel(i: int) -> Path:
    return Path("1.2.3") / f"1.2.3.{i % 3}" / f"1.2.3.4.{i}.dcm"


def payload(i: int, size: int = 100_000) -> bytes:
    return (i.to_bytes(4, "little") + os.urandom(64)) * (size // 68)


def crash(spool: Spool) -> None:
    """Stop as a killed process would: no checkpoint, nothing flushed on purpose (the files
    the placer had written are in the page cache, where the tests then damage them)."""
    assert spool.settle(10)
    spool.log.close(checkpoint=False)


def records(root: Path) -> list[tuple[int, str]]:
    """(sequence number, path) of every well-formed record in the log."""
    out = []
    for seg in sorted((root / ".log").glob("segment-*")):
        fd = os.open(seg, os.O_RDONLY)
        try:
            for seq, off, plen, _dlen, _crc in spool_log._records(fd, seg.stat().st_size):
                out.append((seq, os.pread(fd, plen, off + HEAD.size).decode()))
        finally:
            os.close(fd)
    return sorted(out)


def checkpoint_of(root: Path) -> int:
    return struct.unpack("<Q", (root / ".log" / "checkpoint").read_bytes())[0]


def test_lost_and_damaged_files_are_written_again_from_the_log(tmp_path):
    root = tmp_path / "spool"
    spool = Spool(root, "log", 4 * MIB)
    data = {i: payload(i) for i in range(10)}
    for i, d in data.items():
        spool.store(d, rel(i))
    crash(spool)
    # a power cut took what the page cache held: files missing, cut short, or garbled
    for i in (0, 4, 9):
        (root / rel(i)).unlink()
    for i in (2, 5):
        (root / rel(i)).write_bytes(data[i][:1000])
    garbled = bytearray(data[7])
    garbled[5000] ^= 0xFF
    (root / rel(7)).write_bytes(bytes(garbled))

    again = Spool(root, "log", 4 * MIB)
    assert again.log.restored == 6
    for i, d in data.items():
        assert (root / rel(i)).read_bytes() == d
    assert checkpoint_of(root) == 10  # replayed, synced and checkpointed at opening
    again.close()


def test_checkpointed_records_are_not_replayed(tmp_path):
    """A file deleted after its checkpoint (retention) must not come back."""
    root = tmp_path / "spool"
    spool = Spool(root, "log", 4 * MIB)
    for i in range(3):
        spool.store(payload(i), rel(i))
    assert spool.log.checkpoint(10)
    (root / rel(1)).unlink()
    crash(spool)
    again = Spool(root, "log", 4 * MIB)
    assert again.log.restored == 0
    assert not (root / rel(1)).exists()
    again.close()


def test_idle_checkpoint_follows_the_last_append(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_log, "IDLE_CHECKPOINT_S", 0.2)
    root = tmp_path / "spool"
    spool = Spool(root, "log", 4 * MIB)
    spool.store(payload(1), rel(1))
    deadline = time.monotonic() + 10
    while checkpoint_of(root) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checkpoint_of(root) == 1
    spool.close()


def test_torn_and_foreign_records_are_skipped(tmp_path):
    root = tmp_path / "spool"
    spool = Spool(root, "log", 4 * MIB)
    for i in range(3):
        spool.store(payload(i), rel(i))
    end = max(off for off in _offsets(root / ".log" / "segment-0"))
    crash(spool)
    for i in range(3):
        (root / rel(i)).unlink()
    seg = root / ".log" / "segment-0"
    with open(seg, "r+b") as f:
        # a record whose body never reached the disk (header written, data not)
        f.seek(end)
        f.write(_header(4, b"1.2.3/1.2.3.0/1.2.3.4.99.dcm", b"x" * 500))
    again = Spool(root, "log", 4 * MIB)
    assert again.log.restored == 3
    assert not (root / "1.2.3" / "1.2.3.0" / "1.2.3.4.99.dcm").exists()
    again.close()

    # a well-formed record that names a path outside the spool is refused at replay
    crash(Spool(root, "log", 4 * MIB))
    with open(seg, "r+b") as f:
        body_path, body = b"../../../escaped.dcm", b"evil"
        f.seek(0)
        f.write(_header(10_000, body_path, body, valid_body=True) + body_path + body)
    Spool(root, "log", 4 * MIB).close()
    assert not (tmp_path / "escaped.dcm").exists()
    assert not any(tmp_path.rglob("escaped.dcm"))


def test_segments_wrap_around_under_concurrent_writers(tmp_path):
    """Four writers, 1 MiB segments, 300 KB instances: the log wraps many times, each
    segment reused only after its records were checkpointed, every file intact."""
    root = tmp_path / "spool"
    spool = Spool(root, "log", 1 * MIB)
    data = {i: payload(i, 300_000) for i in range(80)}

    def writer(k: int) -> None:
        for i in range(k, 80, 4):
            spool.store(data[i], rel(i))

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert spool.settle(30)
    for i, d in data.items():
        assert (root / rel(i)).read_bytes() == d
    crash(spool)
    live = [r for r in records(root) if r[0] > checkpoint_of(root)]
    assert len(live) <= 4 * 3  # at most the four segments' worth waits for a checkpoint
    for _seq, path in live:  # the page cache lost every file not yet checkpointed
        (root / path).unlink()
    again = Spool(root, "log", 1 * MIB)
    assert again.log.restored == len(live)
    for i, d in data.items():
        assert (root / rel(i)).read_bytes() == d
    again.close()


def test_acknowledged_before_its_file_was_written_is_not_lost(tmp_path, monkeypatch, caplog):
    """The file of a stored instance is written after the acknowledgement; when that fails
    (disk full) the placer retries and the record stays in the log: a crash then, and the
    next start writes the file from the log."""
    root = tmp_path / "spool"
    spool = Spool(root, "log", 4 * MIB)
    monkeypatch.setattr(Placer, "RETRY_SECONDS", 0.05)

    def full(seq, rel):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool._placer, "_place", full)
    data = payload(1)
    spool.store(data, rel(1))  # returns: durable in the log, acknowledged
    assert spool.placing(rel(1)) and not spool.settle(0.3)
    assert not (root / rel(1)).exists()
    assert "safe in the spool log, retrying" in caplog.text
    spool._placer.close(0)  # the process dies while its file is still to be written
    spool.log.close(checkpoint=False)
    again = Spool(root, "log", 4 * MIB)
    assert again.log.restored == 1
    assert (root / rel(1)).read_bytes() == data
    again.close()


def test_placer_catches_up_after_disk_space_returns(tmp_path, monkeypatch):
    root = tmp_path / "spool"
    spool = Spool(root, "log", 4 * MIB)
    monkeypatch.setattr(Placer, "RETRY_SECONDS", 0.05)
    place, failures = spool._placer._place, []

    def flaky(seq, rel):
        if len(failures) < 3:
            failures.append(rel)
            raise OSError(28, "No space left on device")
        return place(seq, rel)

    monkeypatch.setattr(spool._placer, "_place", flaky)
    data = {i: payload(i) for i in range(3)}
    for i, d in data.items():
        spool.store(d, rel(i))
    assert spool.settle(10)
    assert len(failures) == 3
    for i, d in data.items():
        assert (root / rel(i)).read_bytes() == d
    assert spool.log.checkpoint(10)
    spool.close()


def test_instance_larger_than_a_segment_takes_the_fsync_path(tmp_path):
    root = tmp_path / "spool"
    spool = Spool(root, "log", 1 * MIB)
    big = payload(1, 2 * MIB)
    spool.store(big, rel(1))
    assert (root / rel(1)).read_bytes() == big
    assert records(root) == []
    spool.close()


def test_failed_log_sync_falls_back_to_fsync(tmp_path, monkeypatch, caplog):
    root = tmp_path / "spool"
    spool = Spool(root, "log", 4 * MIB)

    def broken(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    first, second = payload(1), payload(2)
    spool.store(first, rel(1))
    spool.store(second, rel(2))
    assert (root / rel(1)).read_bytes() == first
    assert (root / rel(2)).read_bytes() == second
    assert "storing with fsync per file from now on" in caplog.text
    assert [seq for seq, _ in records(root)] == [1]  # written, never synced: not acknowledged
    monkeypatch.undo()
    spool.close()


def _header(seq: int, path: bytes, data: bytes, valid_body: bool = False) -> bytes:
    body_crc = zlib.crc32(data, zlib.crc32(path)) if valid_body else 0x1234
    head = HEAD.pack(MAGIC, seq, len(path), len(data), body_crc, 0)
    return head[:-4] + struct.pack("<I", zlib.crc32(head[:-4]))


def _offsets(segment: Path) -> list[int]:
    """The end of every record in a segment."""
    fd = os.open(segment, os.O_RDONLY)
    try:
        return [
            off + HEAD.size + plen + dlen
            for _seq, off, plen, dlen, _crc in spool_log._records(fd, segment.stat().st_size)
        ]
    finally:
        os.close(fd)


def test_records_carry_the_zlib_crc32_of_their_header_and_body(tmp_path):
    """The on-disk format: a log written by any nodal replays in any other."""
    root = tmp_path / "spool"
    spool = Spool(root, "log", 4 * MIB)
    data = payload(7)
    spool.store([data[:1000], data[1000:]], rel(7))
    crash(spool)
    raw = (root / ".log" / "segment-0").read_bytes()
    magic, seq, plen, dlen, body_crc, head_crc = HEAD.unpack(raw[: HEAD.size])
    assert (magic, seq, dlen) == (MAGIC, 1, len(data))
    assert head_crc == zlib.crc32(raw[: HEAD.size - 4])
    assert body_crc == zlib.crc32(raw[HEAD.size : HEAD.size + plen + dlen])
    assert raw[HEAD.size + plen : HEAD.size + plen + dlen] == data


def test_a_second_writer_on_the_same_spool_is_refused(tmp_path):
    spool = Spool(tmp_path / "spool", "log", 1 * MIB)
    with pytest.raises(RuntimeError, match="in use by another nodal process"):
        Spool(tmp_path / "spool", "log", 1 * MIB)
    spool.close()
    Spool(tmp_path / "spool", "log", 1 * MIB).close()  # free again once closed


def test_files_wait_for_a_pause_unless_someone_needs_them(tmp_path, monkeypatch):
    """The placer writes files once arrivals pause, at once for a reader (`settle`), and
    before the log runs out of room; each file is the record copied out of the log."""
    monkeypatch.setattr(Placer, "IDLE_SECONDS", 3600.0)  # no pause in this test
    root = tmp_path / "spool"
    spool = Spool(root, "log", 1 * MIB)  # 4 MiB of log: crowded from 2 MiB on
    first = payload(1)
    spool.store(first, rel(1))
    time.sleep(0.3)
    assert spool.placing(rel(1)) and not (root / rel(1)).exists()  # still only in the log
    assert spool.unwritten_bytes() == len(first)  # nodal_spool_log_unwritten_bytes
    assert spool.settle(10)  # a reader: written now
    assert spool.unwritten_bytes() == 0
    assert (root / rel(1)).read_bytes() == first
    data = {i: payload(i, 300_000) for i in range(2, 14)}  # 3.6 MB: over half the log
    for i, d in data.items():
        spool.store(d, rel(i))  # the last ones need segments the placer must free first
    deadline = time.monotonic() + 10
    while not all((root / rel(i)).exists() for i in list(data)[:6]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for i in list(data)[:6]:
        assert (root / rel(i)).read_bytes() == data[i]
    assert spool.settle(10)
    for i, d in data.items():
        assert (root / rel(i)).read_bytes() == d
    spool.close()


def test_files_are_written_once_arrivals_pause(tmp_path, monkeypatch):
    monkeypatch.setattr(Placer, "IDLE_SECONDS", 0.3)
    root = tmp_path / "spool"
    spool = Spool(root, "log", 4 * MIB)
    data = payload(1)
    spool.store(data, rel(1))
    assert not (root / rel(1)).exists()
    deadline = time.monotonic() + 10
    # placed: the file renamed into place, then the placer's record of it dropped (a moment
    # later: on a loaded machine the file can be seen between the two)
    while (not (root / rel(1)).exists() or spool.placing(rel(1))) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (root / rel(1)).read_bytes() == data and not spool.placing(rel(1))
    spool.close()


def test_the_log_counts_no_unwritten_bytes_once_every_file_is_written(tmp_path):
    spool = Spool(tmp_path / "spool", "log", 1 * MIB)
    for i in range(20):  # wraps the 4 MiB log more than once
        spool.store(payload(i, 300_000), rel(i))
    assert spool.settle(10)
    assert spool.log._in_flight_bytes == 0 and not spool.log.crowded()
    spool.close()


@pytest.mark.parametrize("failure", [18, 38])  # EXDEV, ENOSYS: another file system, an old kernel
def test_files_are_copied_out_of_the_log_without_copy_file_range_too(tmp_path, monkeypatch, failure):
    def unavailable(*args, **kwargs):
        raise OSError(failure, os.strerror(failure))

    monkeypatch.setattr(spool_log.os, "copy_file_range", unavailable)
    spool = Spool(tmp_path / "spool", "log", 4 * MIB)
    data = {i: payload(i, 1_500_000) for i in range(3)}  # more than one 1 MiB read each
    for i, d in data.items():
        spool.store(d, rel(i))
    assert spool.settle(10)
    for i, d in data.items():
        assert (tmp_path / "spool" / rel(i)).read_bytes() == d
    spool.close()
