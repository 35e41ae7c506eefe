"""Metrics and audit events from the job rows, in the serve process.

Workers are separate processes (and, scaled out, separate machines), so they do not
touch the metrics: a worker writes what the job measured on the job row (`seconds` per
stage, `findings`, `malignant`), and `JobWatcher` in the serve process observes each job
once when it sees it finished. The row is the one record both sides already share; this
needs no multiprocess metric files, survives a worker crash (a crashed attempt reports
nothing, the next attempt does), and works unchanged with remote workers.

`read_state` gathers the values `/metrics` reads at scrape time (jobs by state, queue
depth, pending deliveries, spool free space, the workers' model and GPU memory).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicom_node.index.db import FINAL_JOB_STATES, Database, Delivery, DeliveryState, Instance, Job, JobState
from dicom_node.observe import audit, metrics

log = logging.getLogger("nodal.observe")

# A job's `finished_at` is set by its worker a moment before the row is committed; rows
# finished up to this long before the last look are looked at again (and skipped if seen).
LOOK_BACK_SECONDS = 120.0


def series_first_received(s: Session, series_uid: str) -> float | None:
    return s.scalar(select(func.min(Instance.received_at)).where(Instance.series_uid == series_uid))


def observe_job(job: Job, first_received: float | None, has_destinations: bool) -> None:
    """Observe one finished job in the metrics."""
    metrics.JOBS_FINISHED.labels(str(job.state)).inc()
    if job.state != JobState.DONE:
        return
    seconds = json.loads(job.seconds) if job.seconds else {}
    for stage, value in seconds.items():
        if stage in metrics.STAGE_SECONDS:
            metrics.STAGE_SECONDS[stage].observe(value)
    if seconds:
        metrics.JOB_SECONDS.observe(sum(seconds.values()))
    if job.findings is not None:
        metrics.FINDINGS_PER_STUDY.observe(job.findings)
    if job.malignant:
        metrics.MALIGNANT_CALLS.inc(job.malignant)
    if not has_destinations and first_received is not None and job.finished_at is not None:
        metrics.END_TO_END.observe(max(0.0, job.finished_at - first_received))
    observe_followup(json.loads(job.followup) if job.followup else None)


def observe_followup(followup: dict | None) -> None:
    """The queries and retrievals a job made for its prior, and what became of it (issue 17)."""
    if not followup:
        return
    if followup.get("outcome") in metrics.FOLLOWUP_OUTCOMES:
        metrics.FOLLOWUPS.labels(followup["outcome"]).inc()
    for op in followup.get("operations", []):
        if op.get("operation") in metrics.QR_OPERATIONS and op.get("outcome") in metrics.QR_OUTCOMES:
            metrics.observe_qr(
                str(op.get("destination", "")),
                op["operation"],
                op["outcome"],
                float(op.get("seconds", 0.0)),
                int(op.get("instances", 0)),
            )


class JobWatcher:
    """Observes every job that finishes while this process runs, exactly once."""

    def __init__(self, db: Database, has_destinations: bool, t: float):
        self.db = db
        self.has_destinations = has_destinations
        self._since = t
        self._seen: dict[tuple[int, float], float] = {}  # (job id, finished_at) -> finished_at
        # Jobs that finished before the start were counted by the previous run.
        with db.session() as s:
            for job in self._finished(s):
                self._seen[(job.id, job.finished_at)] = job.finished_at  # type: ignore[assignment,index]

    def _finished(self, s: Session) -> list[Job]:
        return list(
            s.scalars(
                select(Job).where(
                    Job.finished_at >= self._since - LOOK_BACK_SECONDS,
                    Job.state.in_([str(x) for x in FINAL_JOB_STATES]),
                )
            )
        )

    def poll(self, t: float) -> int:
        """Observe jobs finished since the last poll; returns how many."""
        new: list[tuple[Job, float | None]] = []
        with self.db.session() as s:
            for job in self._finished(s):
                key = (job.id, job.finished_at)
                if key not in self._seen:
                    self._seen[key] = job.finished_at  # type: ignore[assignment,index]
                    new.append((job, series_first_received(s, job.series_uid)))
        for job, first in new:
            observe_job(job, first, self.has_destinations)
            audit.record(
                self.db,
                audit.Event(
                    "job_finished",
                    audit.SUCCESS if job.state in (JobState.DONE, JobState.SKIPPED) else audit.FAILURE,
                    actor="nodal",
                    study_key=audit.study_key(job.study_uid),
                    job_id=job.id,
                    count=job.findings,
                    detail={"state": str(job.state), "attempts": job.attempts, "rule": job.rule},
                ),
            )
        self._since = max(self._since, t)
        cutoff = t - 2 * LOOK_BACK_SECONDS
        self._seen = {k: v for k, v in self._seen.items() if v >= cutoff}
        return len(new)


def read_state(
    db: Database,
    spool_root: Path,
    workers_ready: Callable[[], int],
    models: Callable[[], list[dict[str, str]]],
    gpu_bytes: Callable[[], dict[str, int]],
    unwritten_bytes: Callable[[], int | None] = lambda: None,
) -> metrics.NodeState:
    with db.session() as s:
        jobs = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        pending = dict(
            s.execute(
                select(Delivery.destination, func.count())
                .where(Delivery.state == DeliveryState.PENDING)
                .group_by(Delivery.destination)
            ).all()
        )
    try:
        free = shutil.disk_usage(spool_root).free
    except OSError:
        free = None
    return metrics.NodeState(
        jobs={str(state): jobs.get(str(state), 0) for state in JobState},
        queued=jobs.get(str(JobState.QUEUED), 0),
        deliveries_pending=pending,
        spool_free_bytes=free,
        spool_unwritten_bytes=unwritten_bytes(),
        workers_ready=workers_ready(),
        models=models(),
        gpu_bytes=gpu_bytes(),
    )
