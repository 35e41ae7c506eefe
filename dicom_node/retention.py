"""Retention: delete received instances and result files nobody needs any more.

A study's spool folder goes `retention.spool_days` after its last completion, once none
of its jobs is queued or running and no new instance is waiting. A job's outbox folder
goes `retention.outbox_days` after the job finished, once none of its deliveries is
pending. When free disk space falls under `retention.min_free_gb`, the oldest such data
goes at once, until there is enough space again. Nothing still needed is ever deleted:
pending studies, queued or running jobs and undelivered results stay.
The index keeps the rows of studies and jobs (history for the API), marked purged.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

from sqlalchemy import delete, exists, func, select, update

from dicom_node.config import Settings
from dicom_node.index.db import Database, Delivery, DeliveryState, Instance, Job, JobState, Series, Study
from dicom_node.spool.header import check_uid

log = logging.getLogger("nodal.retention")


def _free_gb(path: Path) -> float:
    return shutil.disk_usage(path).free / 1e9


def purge(db: Database, spool_root: Path, outbox: Path, settings: Settings, t: float) -> tuple[int, int]:
    """Returns (studies purged from the spool, jobs purged from the outbox)."""
    r = settings.retention
    return (
        _purge_studies(db, spool_root, t - r.spool_days * 86400, r.min_free_gb),
        _purge_results(db, outbox, t - r.outbox_days * 86400, r.min_free_gb),
    )


def _purge_studies(db: Database, spool_root: Path, before: float, min_free_gb: float) -> int:
    busy = exists().where(
        Job.study_uid == Study.study_uid, Job.state.in_([JobState.QUEUED, JobState.RUNNING])
    )
    with db.session() as s:
        candidates = s.execute(
            select(Study.study_uid, Study.completed_at)
            .where(
                Study.pending.is_(False), Study.purged_at.is_(None), Study.completed_at.is_not(None), ~busy
            )
            .order_by(Study.completed_at)
        ).all()
    n = 0
    for uid, completed_at in candidates:
        if completed_at > before and _free_gb(spool_root) >= min_free_gb:  # type: ignore[operator]
            break
        with db.session() as s:
            study = s.get(Study, uid)
            running = s.scalar(
                select(func.count())
                .select_from(Job)
                .where(Job.study_uid == uid, Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
            )
            if study is None or study.pending or running:
                continue
            shutil.rmtree(spool_root / check_uid(uid, "study"), ignore_errors=True)
            s.execute(delete(Instance).where(Instance.study_uid == uid))
            s.execute(update(Series).where(Series.study_uid == uid).values(instance_count=0, frame_count=0))
            study.instance_count = 0
            study.purged_at = time.time()
        n += 1
    if n:
        log.info("retention: %d stud(y/ies) removed from the spool", n)
    return n


def _purge_results(db: Database, outbox: Path, before: float, min_free_gb: float) -> int:
    pending = exists().where(Delivery.job_id == Job.id, Delivery.state == DeliveryState.PENDING)
    with db.session() as s:
        candidates = s.execute(
            select(Job.id, Job.result_dir, Job.finished_at)
            .where(
                Job.result_dir.is_not(None),
                Job.results_purged_at.is_(None),
                Job.finished_at.is_not(None),
                ~pending,
            )
            .where(Job.state.not_in([JobState.QUEUED, JobState.RUNNING]))
            .order_by(Job.finished_at)
        ).all()
    n = 0
    for job_id, result_dir, finished_at in candidates:
        if finished_at > before and _free_gb(outbox) >= min_free_gb:  # type: ignore[operator]
            break
        shutil.rmtree(outbox / Path(result_dir).name, ignore_errors=True)  # type: ignore[arg-type]
        with db.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(results_purged_at=time.time()))
        n += 1
    if n:
        log.info("retention: results of %d job(s) removed from the outbox", n)
    return n


class RetentionLoop(threading.Thread):
    def __init__(self, db: Database, settings: Settings, spool_root: Path, outbox: Path):
        super().__init__(daemon=True, name="retention")
        self.db, self.settings, self.spool_root, self.outbox = db, settings, spool_root, outbox
        self._halt = threading.Event()

    def run(self) -> None:
        while True:
            try:
                purge(self.db, self.spool_root, self.outbox, self.settings, time.time())
            except Exception:
                log.exception("retention round failed; trying again later")
            if self._halt.wait(self.settings.retention.interval_seconds):
                return

    def stop(self) -> None:
        self._halt.set()
