"""The index rows of received instances, written in batches by one background thread
(`Indexer`) while the receiving threads wait for their next fsync: the disk, not the
database, sets the pace."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import case, func, insert, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from dicom_node.index.db import PATIENT_NAME_CHARS, Database, Instance, Series, Study
from dicom_node.observe.audit import study_key
from dicom_node.receive.contract import Source
from dicom_node.spool.header import InstanceHeader

log = logging.getLogger("nodal.ingest")


@dataclass(frozen=True)
class Pending:
    """A durable instance waiting for its index row."""

    header: InstanceHeader
    rel: str  # path relative to the spool root
    size: int
    source: Source
    t: float  # when it was acknowledged


def index_batch(db: Database, items: list[Pending], keep_patient: bool = False) -> list[Pending]:
    """Index `items` in one transaction; return those whose SOP Instance UID was already
    indexed (under another path: the same instance sent in another series or study).

    One statement per study, one per series and one multi-row insert for the instances,
    however many instances the batch holds: the indexer's share of the GIL stays small.
    The study row takes the accession number of the batch's latest instance that has one, and
    its patient name and ID only with `keep_patient` (`status_page.show_patient`): the index
    holds no patient's name or ID that nobody is shown."""
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
            _index(s, fresh, keep_patient)
    return duplicates


def _index(s: Session, items: list[Pending], keep_patient: bool) -> None:
    """Insert the instances and bring their studies and series up to date (Core statements)."""
    studies: dict[str, list[Pending]] = {}
    series: dict[str, list[Pending]] = {}
    for p in items:
        studies.setdefault(p.header.study_instance_uid, []).append(p)
        series.setdefault(p.header.series_instance_uid, []).append(p)
    for uid, group in studies.items():
        _upsert_study(s, uid, group, keep_patient)
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


def study_labels(group: list[Pending], keep_patient: bool) -> dict[str, str]:
    """The accession number (and, with `keep_patient`, patient name and ID) that the latest
    instance of `group` (in the order they were acknowledged) carrying each of them gives
    its study; empty values are left out, so an instance without them never blanks what an
    earlier one gave. Usually the last instance has them all: one look per study and batch."""
    labels: dict[str, str] = {}
    for p in reversed(group):
        h = p.header
        for key, value in (
            ("accession_number", h.accession_number),
            ("patient_name", h.patient_name[:PATIENT_NAME_CHARS] if keep_patient else ""),
            ("patient_id", h.patient_id if keep_patient else ""),
        ):
            if value and key not in labels:
                labels[key] = value
        if len(labels) == (3 if keep_patient else 1):
            break
    return labels


def _upsert_study(s: Session, uid: str, group: list[Pending], keep_patient: bool) -> None:
    table = Study.__table__
    first, last = min(p.t for p in group), max(p.t for p in group)
    labels = study_labels(group, keep_patient)
    done = s.execute(  # type: ignore[attr-defined]
        update(table)  # type: ignore[arg-type]
        .where(table.c.study_uid == uid)
        .values(
            last_received_at=case((table.c.last_received_at > last, table.c.last_received_at), else_=last),
            pending=True,
            purged_at=None,
            instance_count=table.c.instance_count + len(group),
            **labels,
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
                **labels,
            )
        )


def _upsert_series(s: Session, uid: str, group: list[Pending]) -> None:
    table = Series.__table__
    latest = max(group, key=lambda p: p.t)
    frames = sum(p.header.frames for p in group)
    scan = _scan(group)
    kept: dict = {}  # what an earlier batch already knew stays; what it lacked is filled in
    for key in ("frame_of_reference_uid", "kernel"):
        if scan[key] is not None:
            kept[key] = func.coalesce(table.c[key], scan[key])
    for low, high in (("acquired_from", "acquired_to"), ("extent_from", "extent_to")):
        if scan[low] is not None:  # the span of the series so far and of this batch
            was_low, was_high = table.c[low], table.c[high]
            kept[low] = case((was_low.is_(None) | (was_low > scan[low]), scan[low]), else_=was_low)
            kept[high] = case((was_high.is_(None) | (was_high < scan[high]), scan[high]), else_=was_high)
    done = s.execute(  # type: ignore[attr-defined]
        update(table)  # type: ignore[arg-type]
        .where(table.c.series_uid == uid)
        .values(
            instance_count=table.c.instance_count + len(group),
            frame_count=table.c.frame_count + frames,
            pending=True,
            last_received_at=latest.t,
            calling_ae=latest.source.calling_ae[:16],
            **kept,
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
                **scan,
            )
        )


def _scan(group: list[Pending]) -> dict:
    """What `group` says of the scan its series reconstructs (None where no instance says):
    the first frame of reference and kernel given, the spans of the acquisition times and
    of the slice positions."""
    headers = [p.header for p in group]
    spans = [h.acquired for h in headers if h.acquired is not None]
    extents = [h.extent_mm for h in headers if h.extent_mm is not None]
    frames_of_reference = [h.frame_of_reference_uid for h in headers if h.frame_of_reference_uid]
    return {
        "frame_of_reference_uid": frames_of_reference[0] if frames_of_reference else None,
        "kernel": next((h.kernel for h in headers if h.kernel), None),
        "acquired_from": min(low for low, _ in spans) if spans else None,
        "acquired_to": max(high for _, high in spans) if spans else None,
        "extent_from": min(low for low, _ in extents) if extents else None,
        "extent_to": max(high for _, high in extents) if extents else None,
    }


class Indexer:
    """One thread writing index rows in batches of up to `BATCH` instances.

    After the first pending instance it sleeps for `WINDOW` seconds and takes what came
    meanwhile: a sender that stores one instance at a time then costs one transaction (and
    one wake-up of this thread) per window, not per instance. Acknowledgements never wait
    for the index (the spool is the record)."""

    BATCH = 256
    WINDOW = 0.1

    def __init__(self, db: Database, spool_root: Path, settle=None, keep_patient: bool = False):
        self.db = db
        self.spool_root = spool_root
        self.keep_patient = keep_patient  # status_page.show_patient
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
                duplicates = index_batch(self.db, batch, self.keep_patient)
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
