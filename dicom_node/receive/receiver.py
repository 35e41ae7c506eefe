"""Receiving one instance, whichever way it came: check, store durably once, index.

`Receiver.store_dataset` (C-STORE: the dataset without file meta), `Receiver.store_bytes`
(a Part 10 file's bytes) and `Receiver.store_temp` (STOW-RS part already in the spool's
temporary folder) return a `StoreResult` only once the file is durable, or once
it was refused for a stated reason. A SOP Instance UID already stored is acknowledged as
success and not written again.

The index rows are written by one background thread (`indexer.Indexer`) in batches, while the
receiving threads wait for their next fsync: the disk, not the database, sets the pace.
The spool is the record: files acknowledged but not yet indexed when the process dies
are indexed by `reconcile.reconcile` at the next start. Whoever reads study state (completion,
the end of an association) calls `Receiver.flush_index()` first; whoever reads the files
(a study about to be completed, the API) calls `Receiver.flush()`, which also waits for
the spool's log to have written them (`spool.durability: log`).

`transfers.Transfers` remembers which studies each open association (or STOW request) brought, so
that completion can use the shorter quiet period once all of them were released.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from pathlib import Path

from dicom_node.index.db import Database, Study, now
from dicom_node.observe import metrics
from dicom_node.receive.contract import (
    CANNOT_UNDERSTAND,
    DATASET_MISMATCH,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    SUCCESS,
    Outcome,
    Source,
    StoreResult,
)
from dicom_node.receive.indexer import Indexer, Pending
from dicom_node.receive.transfers import Transfers, TransferSummary
from dicom_node.spool.header import InstanceHeader, InvalidInstanceError, read_dataset_header, read_header
from dicom_node.spool.part10 import file_meta_prefix
from dicom_node.spool.store import Data, Spool, pieces, relative_path

log = logging.getLogger("nodal.ingest")


class Receiver:
    def __init__(self, spool: Spool, db: Database, min_free_bytes: int = 0, keep_patient: bool = False):
        """`keep_patient`: the index keeps patient name and ID (`status_page.show_patient`)."""
        self.spool = spool
        self.db = db
        self.min_free_bytes = min_free_bytes
        self.transfers = Transfers()
        self._stripes = [threading.Lock() for _ in range(64)]
        self.indexer = Indexer(db, spool.root, spool.settle, keep_patient)

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


def _refused(status: int, reason: str, source: Source, header: InstanceHeader | None = None) -> StoreResult:
    log.warning(
        "refused an instance from %s (%s, %s): %s",
        source.calling_ae or "-",
        source.via,
        source.peer_host,
        reason,
    )
    return StoreResult(Outcome.REFUSED, status, header, reason)
