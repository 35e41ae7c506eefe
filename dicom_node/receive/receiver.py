"""Receiving one instance, whichever way it came: check, store durably once, index.

`Receiver.store_dataset` (C-STORE: the dataset without file meta), `Receiver.store_bytes`
(a Part 10 file's bytes) and `Receiver.store_temp` (STOW-RS part already in the spool's
temporary folder) return a `StoreResult` only once the file is durable, or once
it was refused for a stated reason. A SOP Instance UID already stored is acknowledged as
success and not written again.

The index rows are written by one background thread (`Indexer`) in batches, while the
receiving threads wait for their next fsync: the disk, not the database, sets the pace.
The spool is the record: files acknowledged but not yet indexed when the process dies
are indexed by `reconcile` at the next start. Whoever reads study state (completion,
the end of an association) calls `Receiver.flush_index()` first; whoever reads the files
(a study about to be completed, the API) calls `Receiver.flush()`, which also waits for
the spool's log to have written them (`spool.durability: log`).

`Transfers` remembers which studies each open association (or STOW request) brought, so
that completion can use the shorter quiet period once all of them were released.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import case, insert, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from dicom_node.index.db import Database, Instance, Series, Study, now
from dicom_node.observe import metrics
from dicom_node.observe.audit import study_key
from dicom_node.spool.header import InstanceHeader, InvalidInstanceError, read_dataset_header, read_header
from dicom_node.spool.part10 import file_meta_prefix
from dicom_node.spool.store import Data, Spool, pieces, relative_path

log = logging.getLogger("nodal.ingest")

# DIMSE status codes (PS3.4 Annex B) used by both receivers.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110


class Outcome(enum.StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    REFUSED = "refused"


@dataclass(frozen=True)
class Source:
    via: str  # dimse | stow
    transfer_id: str  # the association or request that brought the instance
    calling_ae: str = ""
    peer_host: str = ""


@dataclass(frozen=True)
class StoreResult:
    outcome: Outcome
    status: int  # DIMSE status: 0x0000 or the failure code
    header: InstanceHeader | None = None
    reason: str = ""


@dataclass
class TransferSummary:
    """What one association or request brought: acknowledged instances per study, and the
    instances by outcome."""

    studies: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)


class Transfers:
    """Open associations / requests and the studies each one brought (in memory)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, TransferSummary] = {}

    def begin(self, transfer_id: str) -> None:
        with self._lock:
            self._open.setdefault(transfer_id, TransferSummary())

    def touch(self, transfer_id: str, study_uid: str) -> None:
        with self._lock:
            studies = self._open.setdefault(transfer_id, TransferSummary()).studies
            studies[study_uid] = studies.get(study_uid, 0) + 1

    def tally(self, transfer_id: str, outcome: Outcome) -> None:
        with self._lock:
            outcomes = self._open.setdefault(transfer_id, TransferSummary()).outcomes
            outcomes[outcome.value] = outcomes.get(outcome.value, 0) + 1

    def end(self, transfer_id: str) -> tuple[set[str], TransferSummary | None]:
        """Forget the transfer; return its studies that no other open transfer is bringing,
        and its summary (None when it was not open)."""
        with self._lock:
            summary = self._open.pop(transfer_id, None)
            still_open = set().union(*(t.studies for t in self._open.values()))
        return set(summary.studies if summary else ()) - still_open, summary

    def open_studies(self) -> set[str]:
        with self._lock:
            return set().union(*(t.studies for t in self._open.values()))


class Receiver:
    def __init__(self, spool: Spool, db: Database, min_free_bytes: int = 0):
        self.spool = spool
        self.db = db
        self.min_free_bytes = min_free_bytes
        self.transfers = Transfers()
        self._stripes = [threading.Lock() for _ in range(64)]
        self.indexer = Indexer(db, spool.root, spool.settle)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every acknowledged instance is in the spool and the index (False on
        timeout)."""
        deadline = time.monotonic() + timeout
        return self.indexer.flush(timeout) and self.spool.settle(max(0.0, deadline - time.monotonic()))

    def flush_index(self, timeout: float = 30.0) -> bool:
        """Wait until every acknowledged instance is in the index; its file may still be on
        its way from the spool's log (`Spool.settle` before reading files)."""
        return self.indexer.flush(timeout)

    def close(self) -> None:
        self.indexer.close()

    def store_bytes(
        self,
        data: bytes,
        source: Source,
        expected_sop_uid: str | None = None,
        expected_sop_class_uid: str | None = None,
    ) -> StoreResult:
        """Store a Part 10 byte string (preamble, meta, dataset as received)."""
        t = time.perf_counter()
        result = self._store_bytes(data, source, expected_sop_uid, expected_sop_class_uid)
        self._count(result, source, len(data), time.perf_counter() - t)
        return result

    def _count(self, result: StoreResult, source: Source, size: int, seconds: float) -> None:
        metrics.STORE_SECONDS.labels(source.via).observe(seconds)
        metrics.INSTANCES_RECEIVED.labels(source.via, result.outcome.value).inc()
        if result.outcome is not Outcome.REFUSED:
            metrics.BYTES_RECEIVED.labels(source.via).inc(size)
        self.transfers.tally(source.transfer_id, result.outcome)

    def store_dataset(
        self,
        dataset: bytes,
        transfer_syntax_uid: str,
        source: Source,
        expected_sop_uid: str | None = None,
        expected_sop_class_uid: str | None = None,
    ) -> StoreResult:
        """Store a dataset as a C-STORE brings it (no file meta): the spool file is its
        file meta prefix and then `dataset` as received, never joined in memory."""
        t = time.perf_counter()
        try:
            header = read_dataset_header(dataset, transfer_syntax_uid, source.calling_ae)
        except InvalidInstanceError as e:
            result = _refused(CANNOT_UNDERSTAND, str(e), source)
        else:
            result = self._checked(header, expected_sop_uid, expected_sop_class_uid, source) or self._store(
                header,
                source,
                (
                    file_meta_prefix(
                        header.sop_class_uid,
                        header.sop_instance_uid,
                        header.transfer_syntax_uid,
                        source.calling_ae,
                    ),
                    dataset,
                ),
                None,
            )
        self._count(result, source, len(dataset), time.perf_counter() - t)
        return result

    def _store_bytes(
        self,
        data: bytes,
        source: Source,
        expected_sop_uid: str | None,
        expected_sop_class_uid: str | None,
    ) -> StoreResult:
        try:
            header = read_header(data)
        except InvalidInstanceError as e:
            return _refused(CANNOT_UNDERSTAND, str(e), source)
        return self._checked(header, expected_sop_uid, expected_sop_class_uid, source) or self._store(
            header, source, data, None
        )

    @staticmethod
    def _checked(
        header: InstanceHeader,
        expected_sop_uid: str | None,
        expected_sop_class_uid: str | None,
        source: Source,
    ) -> StoreResult | None:
        """The refusal when the dataset's SOP Instance or Class UID differs from the request's."""
        if expected_sop_uid is not None and header.sop_instance_uid != expected_sop_uid.rstrip("\0 "):
            return _refused(
                DATASET_MISMATCH, "SOP Instance UID differs from the C-STORE request", source, header
            )
        if expected_sop_class_uid is not None and header.sop_class_uid != expected_sop_class_uid.rstrip(
            "\0 "
        ):
            return _refused(
                DATASET_MISMATCH, "SOP Class UID differs from the C-STORE request", source, header
            )
        return None

    def store_temp(self, temp: Path, source: Source, expected_study_uid: str | None = None) -> StoreResult:
        """Store a Part 10 file already written to the spool's temporary folder (consumed)."""
        try:
            size = temp.stat().st_size
        except OSError:
            size = 0
        t = time.perf_counter()
        result = self._store_temp(temp, source, expected_study_uid)
        self._count(result, source, size, time.perf_counter() - t)
        return result

    def _store_temp(self, temp: Path, source: Source, expected_study_uid: str | None) -> StoreResult:
        try:
            header = read_header(temp)
        except InvalidInstanceError as e:
            self.spool.discard(temp)
            return _refused(CANNOT_UNDERSTAND, str(e), source)
        if expected_study_uid is not None and header.study_instance_uid != expected_study_uid:
            self.spool.discard(temp)
            return _refused(
                PROCESSING_FAILURE,
                "Study Instance UID differs from the study in the request URL",
                source,
                header,
            )
        return self._store(header, source, None, temp)

    def _store(
        self, header: InstanceHeader, source: Source, data: Data | None, temp: Path | None
    ) -> StoreResult:
        """Store `data` (or the temporary file `temp`) unless its SOP Instance UID is known.

        A file appears under its final name only once it is durable, so an existing final
        path is a stored copy (a stat, not a query); the index's primary key catches the
        same SOP Instance UID arriving under another study or series.
        """
        sop = header.sop_instance_uid
        rel = relative_path(header)
        final = self.spool.root / rel
        with self._stripes[zlib.crc32(sop.encode()) % len(self._stripes)]:
            if final.exists() or self.spool.placing(rel):
                return self._duplicate(header, source, temp)
            if self.min_free_bytes and self.spool.free_bytes() < self.min_free_bytes:
                if temp is not None:
                    self.spool.discard(temp)
                return _refused(OUT_OF_RESOURCES, "spool disk almost full", source, header)
            try:
                if temp is None:
                    size = sum(map(len, pieces(data or b"")))
                    self.spool.store(data or b"", rel)
                else:
                    size = temp.stat().st_size
                    self.spool.commit(temp, rel)
            except OSError as e:
                if temp is not None:
                    self.spool.discard(temp)
                log.error("could not store an instance durably: %s", e.strerror or type(e).__name__)
                return _refused(OUT_OF_RESOURCES, f"storage error: {e.strerror or type(e).__name__}", source)
            self.indexer.submit(Pending(header, str(rel), size, source, now()))
        self.transfers.touch(source.transfer_id, header.study_instance_uid)
        return StoreResult(Outcome.STORED, SUCCESS, header)

    def _duplicate(self, header: InstanceHeader, source: Source, temp: Path | None) -> StoreResult:
        if temp is not None:
            self.spool.discard(temp)
        self.transfers.touch(source.transfer_id, header.study_instance_uid)
        return StoreResult(Outcome.DUPLICATE, SUCCESS, header)

    def release(self, transfer_id: str, released: bool) -> TransferSummary | None:
        """The association or request ended; `released` False means aborted. Returns what it
        brought (None when it was already released)."""
        studies, summary = self.transfers.end(transfer_id)
        if not released or not studies:
            return summary
        self.flush_index()
        t = now()
        with self.db.session() as s:
            for uid in studies:
                study = s.get(Study, uid)
                if study is not None:
                    study.released_at = t
        return summary


def summary_line(summary: TransferSummary) -> str:
    """`12 stored, 0 duplicate, 0 refused; studies 3f2a...(12)` (study keys, never UIDs)."""
    counts = ", ".join(f"{summary.outcomes.get(o.value, 0)} {o.value}" for o in Outcome)
    studies = ", ".join(f"{study_key(uid)} ({n})" for uid, n in summary.studies.items())
    return f"{counts}; studies: {studies or 'none'}"


@dataclass(frozen=True)
class Pending:
    """A durable instance waiting for its index row."""

    header: InstanceHeader
    rel: str  # path relative to the spool root
    size: int
    source: Source
    t: float  # when it was acknowledged


def index_batch(db: Database, items: list[Pending]) -> list[Pending]:
    """Index `items` in one transaction; return those whose SOP Instance UID was already
    indexed (under another path: the same instance sent in another series or study).

    One statement per study, one per series and one multi-row insert for the instances,
    however many instances the batch holds: the indexer's share of the GIL stays small."""
    duplicates: list[Pending] = []
    fresh: list[Pending] = []
    with db.session() as s:
        sops = [p.header.sop_instance_uid for p in items]
        known = set(s.scalars(select(Instance.sop_uid).where(Instance.sop_uid.in_(sops))))
        for p in items:
            if p.header.sop_instance_uid in known:
                duplicates.append(p)
            else:
                known.add(p.header.sop_instance_uid)
                fresh.append(p)
        if fresh:
            _index(s, fresh)
    return duplicates


def _index(s: Session, items: list[Pending]) -> None:
    """Insert the instances and bring their studies and series up to date (Core statements)."""
    studies: dict[str, list[Pending]] = {}
    series: dict[str, list[Pending]] = {}
    for p in items:
        studies.setdefault(p.header.study_instance_uid, []).append(p)
        series.setdefault(p.header.series_instance_uid, []).append(p)
    for uid, group in studies.items():
        _upsert_study(s, uid, group)
    for uid, group in series.items():
        _upsert_series(s, uid, group)
    s.execute(
        insert(Instance.__table__),  # type: ignore[arg-type]
        [
            {
                "sop_uid": p.header.sop_instance_uid,
                "series_uid": p.header.series_instance_uid,
                "study_uid": p.header.study_instance_uid,
                "sop_class_uid": p.header.sop_class_uid,
                "transfer_syntax_uid": p.header.transfer_syntax_uid,
                "path": p.rel,
                "size": p.size,
                "frames": p.header.frames,
                "received_at": p.t,
                "via": p.source.via,
                "calling_ae": p.source.calling_ae[:16],
                "peer_host": p.source.peer_host[:64],
            }
            for p in items
        ],
    )


def _upsert_study(s: Session, uid: str, group: list[Pending]) -> None:
    table = Study.__table__
    first, last = min(p.t for p in group), max(p.t for p in group)
    done = s.execute(  # type: ignore[attr-defined]
        update(table)  # type: ignore[arg-type]
        .where(table.c.study_uid == uid)
        .values(
            last_received_at=case((table.c.last_received_at > last, table.c.last_received_at), else_=last),
            pending=True,
            purged_at=None,
            instance_count=table.c.instance_count + len(group),
        )
    ).rowcount
    if not done:
        s.execute(
            insert(table).values(  # type: ignore[arg-type]
                study_uid=uid,
                first_received_at=first,
                last_received_at=last,
                pending=True,
                completions=0,
                instance_count=len(group),
            )
        )


def _upsert_series(s: Session, uid: str, group: list[Pending]) -> None:
    table = Series.__table__
    latest = max(group, key=lambda p: p.t)
    frames = sum(p.header.frames for p in group)
    done = s.execute(  # type: ignore[attr-defined]
        update(table)  # type: ignore[arg-type]
        .where(table.c.series_uid == uid)
        .values(
            instance_count=table.c.instance_count + len(group),
            frame_count=table.c.frame_count + frames,
            pending=True,
            last_received_at=latest.t,
            calling_ae=latest.source.calling_ae[:16],
        )
    ).rowcount
    if not done:
        h = group[0].header
        s.execute(
            insert(table).values(  # type: ignore[arg-type]
                series_uid=uid,
                study_uid=h.study_instance_uid,
                modality=h.modality,
                sop_class_uid=h.sop_class_uid,
                image_type="\\".join(h.image_type),
                slice_thickness_mm=h.slice_thickness_mm,
                description=h.series_description,
                instance_count=len(group),
                frame_count=frames,
                pending=True,
                last_received_at=latest.t,
                calling_ae=latest.source.calling_ae[:16],
            )
        )


class Indexer:
    """One thread writing index rows in batches of up to `BATCH` instances.

    After the first pending instance it sleeps for `WINDOW` seconds and takes what came
    meanwhile: a sender that stores one instance at a time then costs one transaction (and
    one wake-up of this thread) per window, not per instance. Acknowledgements never wait
    for the index (the spool is the record)."""

    BATCH = 256
    WINDOW = 0.1

    def __init__(self, db: Database, spool_root: Path, settle=None):
        self.db = db
        self.spool_root = spool_root
        self._settle = settle  # waits until the spool files of what was stored are written
        self._q: queue.Queue[Pending | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="indexer", daemon=True)
        self._thread.start()

    def submit(self, item: Pending) -> None:
        self._q.put(item)

    def flush(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._q.all_tasks_done:
            while self._q.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0 or not self._q.all_tasks_done.wait(left):
                    return False
        return True

    def close(self) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join(60)

    def _run(self) -> None:
        while True:
            taken = [self._q.get()]
            if taken[0] is not None and self._q.qsize() < self.BATCH:
                time.sleep(self.WINDOW)  # asleep, not woken by each instance that joins the batch
            while len(taken) < self.BATCH and taken[-1] is not None:
                try:
                    taken.append(self._q.get_nowait())
                except queue.Empty:
                    break
            stop = taken[-1] is None
            batch = taken[:-1] if stop else taken
            if batch:
                self._write(batch)  # type: ignore[arg-type]
            for _ in taken:
                self._q.task_done()
            if stop:
                return

    def _write(self, batch: list[Pending]) -> None:
        while True:
            try:
                duplicates = index_batch(self.db, batch)
                break
            except SQLAlchemyError as e:  # the files are safe on disk; keep trying
                log.error("index write failed (%s); retrying in 1 s", type(e).__name__)
                time.sleep(1.0)
        per_study: dict[str, int] = {}
        for p in batch:
            key = study_key(p.header.study_instance_uid)
            per_study[key] = per_study.get(key, 0) + 1
        log.debug(
            "indexed a batch of %d instance(s) (%d already held): %s",
            len(batch),
            len(duplicates),
            ", ".join(f"study {k} ({n})" for k, n in per_study.items()),
            extra={"event": "instance_batch", "count": len(batch)},
        )
        for dup in duplicates:
            self._drop_duplicate(dup)

    def _drop_duplicate(self, dup: Pending) -> None:
        if self._settle is not None:
            self._settle(60.0)  # its file may still be on its way from the log
        with self.db.session() as s:
            kept = s.scalar(select(Instance.path).where(Instance.sop_uid == dup.header.sop_instance_uid))
        if kept != dup.rel:
            (self.spool_root / dup.rel).unlink(missing_ok=True)
            log.info("an instance already held under another series was received again; kept the first copy")


def _refused(status: int, reason: str, source: Source, header: InstanceHeader | None = None) -> StoreResult:
    log.warning(
        "refused an instance from %s (%s, %s): %s",
        source.calling_ae or "-",
        source.via,
        source.peer_host,
        reason,
    )
    return StoreResult(Outcome.REFUSED, status, header, reason)


def reconcile(spool: Spool, db: Database) -> tuple[int, int]:
    """After a crash: drop unacknowledged temporary files, index spool files the index lost.

    Returns (temporary files removed, files re-indexed).
    """
    removed = spool.clear_temp()
    recovered = 0
    with db.session() as s:
        known = set(s.scalars(select(Instance.path)))
    for path in spool.files():
        rel = str(path.relative_to(spool.root))
        if rel in known:
            continue
        try:
            header = read_header(path)
        except InvalidInstanceError as e:
            log.warning("spool file %s is not a readable instance (%s); left in place", rel, e)
            continue
        if str(relative_path(header)) != rel:
            log.warning("spool file %s does not match its own UIDs; left in place", rel)
            continue
        source = Source(via="recovered", transfer_id="reconcile", calling_ae=header.source_ae)
        if index_batch(db, [Pending(header, rel, path.stat().st_size, source, path.stat().st_mtime)]):
            log.warning("spool file %s repeats an indexed SOP Instance UID; left in place", rel)
            continue
        recovered += 1
    if removed or recovered:
        log.info(
            "spool reconciled: %d unacknowledged temporary file(s) removed, %d re-indexed", removed, recovered
        )
    return removed, recovered
