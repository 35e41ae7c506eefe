"""Crash recovery at start-up: the spool is the record, the index follows it."""

from __future__ import annotations

import logging

from sqlalchemy import select

from dicom_node.index.db import Database, Instance
from dicom_node.receive.contract import Source
from dicom_node.receive.indexer import Pending, index_batch
from dicom_node.spool.header import InvalidInstanceError, read_header
from dicom_node.spool.store import Spool, relative_path

log = logging.getLogger("nodal.ingest")


def reconcile(spool: Spool, db: Database, keep_patient: bool = False) -> tuple[int, int]:
    """After a crash: drop unacknowledged temporary files, index spool files the index lost
    (`keep_patient`: with patient name and ID, as `status_page.show_patient` says).

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
        pending = Pending(header, rel, path.stat().st_size, source, path.stat().st_mtime)
        if index_batch(db, [pending], keep_patient):
            log.warning("spool file %s repeats an indexed SOP Instance UID; left in place", rel)
            continue
        recovered += 1
    if removed or recovered:
        log.info(
            "spool reconciled: %d unacknowledged temporary file(s) removed, %d re-indexed", removed, recovered
        )
    return removed, recovered
