"""The durable job table: claim with a lease, renew, finish, re-queue, supersede, retry.

A worker owns a running job while its lease (`lease_owner`, `lease_expires_at`) is fresh;
it renews the lease while it works. A job whose lease expired (its worker crashed or was
killed) is queued again, and counts as an attempt; after `max_attempts` it fails. Every
state change checks the owner, so a worker that lost its lease cannot overwrite the work
of the one that took the job over.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session, object_session

from dicom_node.config import Settings
from dicom_node.index.db import (
    FINAL_JOB_STATES,
    Database,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Series,
    Study,
)
from dicom_node.jobs.outcome import JobOutcome

log = logging.getLogger("nodal.jobs")


class JobConflict(ValueError):
    """The requested change does not fit the job's state (HTTP 409)."""


class NotInSpool(JobConflict):
    """The instances a job would read are no longer in the spool (retention removed them)."""


def owner_id(worker: int | str, pid: int | None = None) -> str:
    """Who holds a lease: host, process id and worker name."""
    return f"{socket.gethostname()}:{pid or os.getpid()}:{worker}"


def supersede_older(s: Session, job: Job, t: float) -> None:
    """Older jobs of `job`'s series give way: finished ones become superseded at once,
    a running one when it finishes; their undelivered results are cancelled."""
    older = s.scalars(
        select(Job).where(Job.series_uid == job.series_uid, Job.id < job.id, Job.state != JobState.SUPERSEDED)
    )
    for old in older:
        old.superseded_by = job.id
        if old.state != JobState.RUNNING:
            old.state = JobState.SUPERSEDED
            old.finished_at = old.finished_at or t
            old.lease_owner = old.lease_expires_at = None
        _cancel_deliveries(s, old.id, f"superseded by job {job.id}")


def _cancel_deliveries(s: Session, job_id: int, why: str) -> None:
    s.execute(
        update(Delivery)
        .where(Delivery.job_id == job_id, Delivery.state == DeliveryState.PENDING)
        .values(state=DeliveryState.CANCELLED, last_error=why)
    )


def claim(db: Database, owner: str, lease_seconds: float, t: float, job_id: int | None = None) -> Job | None:
    """Take the oldest due queued job (or job `job_id` if it is queued and due), or None.

    A claimed job is RUNNING under `owner`, so a second claim of the same job (a duplicate
    queue message, another worker) finds nothing."""
    query = select(Job).where(Job.state == JobState.QUEUED, Job.not_before <= t)
    if job_id is not None:
        query = query.where(Job.id == job_id)
    query = query.order_by(Job.not_before, Job.id).limit(1).with_for_update(skip_locked=True)
    with db.session() as s:
        job = s.scalars(query).first()
        if job is None:
            return None
        job.state = JobState.RUNNING
        job.lease_owner = job.worker = owner
        job.published_at = None  # a re-queued job is announced again as soon as it is due
        job.lease_expires_at = t + lease_seconds
        job.attempts += 1
        job.started_at = t
        return job


def renew(db: Database, job_id: int, owner: str, lease_seconds: float, t: float) -> bool:
    """Extend the lease; False when this owner no longer holds the job."""
    with db.session() as s:
        n = s.execute(  # type: ignore[attr-defined]
            update(Job)
            .where(Job.id == job_id, Job.lease_owner == owner, Job.state == JobState.RUNNING)
            .values(lease_expires_at=t + lease_seconds)
        ).rowcount
    return n == 1


def _owned(s: Session, job_id: int, owner: str) -> Job | None:
    job = s.get(Job, job_id, with_for_update=True)
    if job is None or job.state != JobState.RUNNING or job.lease_owner != owner:
        log.warning("job %d: lease lost before the attempt finished; its outcome is dropped", job_id)
        return None
    return job


def finish_done(db: Database, job_id: int, owner: str, out: JobOutcome, settings: Settings, t: float) -> bool:
    """Record a successful attempt and queue one delivery per destination and result file."""
    with db.session() as s:
        job = _owned(s, job_id, owner)
        if job is None:
            return False
        job.lease_owner = job.lease_expires_at = None
        job.finished_at = t
        job.result_dir = out.result_dir
        job.findings = out.findings
        job.malignant = out.malignant
        job.seconds = json.dumps({k: round(v, 3) for k, v in out.seconds.items()})
        job.followup = json.dumps(out.followup) if out.followup is not None else None
        job.last_error = None
        if job.superseded_by is not None:
            job.state = JobState.SUPERSEDED
            log.info(
                "job %d finished but was superseded by job %d; its results are not sent",
                job.id,
                job.superseded_by,
            )
            return True
        job.state = JobState.DONE
        expires = t + settings.delivery.expire_hours * 3600
        for dest in settings.result_destinations():
            for f in out.files:
                s.add(
                    Delivery(
                        job_id=job.id,
                        destination=dest.name,
                        sop_uid=f.sop_instance_uid,
                        sop_class_uid=f.sop_class_uid,
                        file=f.file,
                        state=DeliveryState.PENDING,
                        created_at=t,
                        expires_at=expires,
                        next_attempt_at=t,
                    )
                )
        if not settings.result_destinations():
            log.info("job %d done; no destination takes results, they are kept in the outbox", job.id)
        return True


def finish_error(
    db: Database,
    job_id: int,
    owner: str,
    error: str,
    settings: Settings,
    t: float,
    final_state: JobState | None,
) -> bool:
    """Record a failed attempt: `final_state` (skipped/failed) ends the job; None retries it
    after a backoff while attempts remain."""
    with db.session() as s:
        job = _owned(s, job_id, owner)
        if job is None:
            return False
        _after_failure(job, error, settings, t, final_state)
        return True


def latest_jobs(s: Session, study_uid: str) -> dict[str, Job]:
    """The newest job of each series of a study."""
    jobs = s.scalars(select(Job).where(Job.study_uid == study_uid).order_by(Job.id))
    return {j.series_uid: j for j in jobs}


def without_results(job: Job) -> bool:
    """Whether `job` ended without results for its series: failed, or refused by the loader
    (skipped after an attempt; routing's skips have none)."""
    return job.state == JobState.FAILED or (job.state == JobState.SKIPPED and job.attempts > 0)


def _after_failure(job: Job, error: str, settings: Settings, t: float, final_state: JobState | None) -> None:
    job.lease_owner = job.lease_expires_at = None
    job.last_error = error
    if job.superseded_by is not None:
        job.state, job.finished_at = JobState.SUPERSEDED, t
    elif final_state is not None:
        job.state, job.finished_at, job.reason = final_state, t, error
    elif job.attempts >= settings.jobs.max_attempts:
        job.state, job.finished_at = JobState.FAILED, t
        job.reason = f"gave up after {job.attempts} attempt(s): {error}"
    else:
        job.state = JobState.QUEUED
        job.not_before = t + settings.jobs.retry_delay_seconds * 2 ** (job.attempts - 1)
    log.warning(
        "job %d attempt %d: %s -> %s",
        job.id,
        job.attempts,
        error,
        job.state,
        extra={"event": "job", "job_id": job.id, "state": str(job.state)},
    )
    if without_results(job):
        _route_other_reconstructions_again(job)


def names_analysed(reason: str | None, series_uid: str) -> bool:
    """Whether a routing skip's reason names `series_uid` as the reconstruction of its scan
    analysed in its place (as `completion.reconstructions.Reconstruction.label` words it)."""
    return f"series {series_uid} (" in (reason or "")


def _reconstruction_skip(job: Job) -> bool:
    """A series a rule selected, skipped before any attempt: another reconstruction answers for it."""
    return job.state == JobState.SKIPPED and job.attempts == 0 and bool(job.rule)


def _route_other_reconstructions_again(job: Job) -> None:
    """The series of `job` gets no results: the series of its study that were skipped as
    answered for by it (selected by a rule, skipped before any attempt, their reason naming
    it) are routed again at the study's next completion, which then chooses among the rest
    (`completion.quiet.decisions`)."""
    s = object_session(job)
    assert s is not None
    study = s.get(Study, job.study_uid, with_for_update=True)  # the order completion locks in
    others = [
        uid
        for uid, j in latest_jobs(s, job.study_uid).items()
        if _reconstruction_skip(j) and names_analysed(j.reason, job.series_uid)
    ]
    if study is None or not others:
        return
    for series in s.scalars(select(Series).where(Series.series_uid.in_(others))):
        series.pending = True
    study.pending = True
    log.info(
        "job %d ended without results: %d other reconstruction(s) of its study routed again",
        job.id,
        len(others),
        extra={"event": "job", "job_id": job.id},
    )


def requeue_lost(
    db: Database, settings: Settings, t: float, dead_owners: AbstractSet[str] = frozenset()
) -> int:
    """Running jobs whose lease expired, or whose owner is known dead, count a failed attempt."""
    n = 0
    with db.session() as s:
        for job in s.scalars(select(Job).where(Job.state == JobState.RUNNING).with_for_update()):
            expired = job.lease_expires_at is not None and job.lease_expires_at < t
            if expired or job.lease_owner in dead_owners or _owner_dead(job.lease_owner):
                _after_failure(
                    job, "worker lost (crash, kill or restart) while the job ran", settings, t, None
                )
                n += 1
    return n


def _owner_dead(owner: str | None) -> bool:
    """True for an owner on this host whose process no longer exists."""
    if not owner:
        return True
    host, _, rest = owner.partition(":")
    if host != socket.gethostname():
        return False
    try:
        pid = int(rest.split(":", 1)[0])
    except ValueError:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """A killed worker whose new parent does not reap it (a container's init) stays a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def release(db: Database, job_id: int, owner: str, why: str) -> None:
    """Give a running job back without counting the attempt (orderly shutdown)."""
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None or job.state != JobState.RUNNING or job.lease_owner != owner:
            return
        job.state = JobState.QUEUED
        job.attempts = max(0, job.attempts - 1)
        job.lease_owner = job.lease_expires_at = None
        job.last_error = why


def retry(db: Database, job_id: int, settings: Settings, t: float) -> Job:
    """Run a finished job again, or re-send its failed deliveries."""
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise KeyError(job_id)
        if job.state == JobState.SUPERSEDED:
            raise JobConflict(f"job {job.id} was superseded by job {job.superseded_by}; retry that one")
        if job.state in (JobState.QUEUED, JobState.RUNNING):
            raise JobConflict(f"job {job.id} is {job.state}; nothing to retry")
        if job.state == JobState.DONE:
            failed = s.scalars(
                select(Delivery).where(Delivery.job_id == job.id, Delivery.state == DeliveryState.FAILED)
            ).all()
            if not failed:
                raise JobConflict(f"job {job.id} is done and has no failed deliveries")
            for d in failed:
                d.state = DeliveryState.PENDING
                d.next_attempt_at = t
                d.expires_at = t + settings.delivery.expire_hours * 3600
                d.attempts = 0
            log.info("job %d: %d failed deliveries queued again", job.id, len(failed))
            return job
        job.state = JobState.QUEUED
        job.attempts = 0
        job.not_before = t
        job.finished_at = None
        job.reason = None
        log.info("job %d queued again by request", job.id)
        return job


def routed(latest: Job) -> bool:
    """Whether the series of `latest` (its newest job) was chosen for analysis: every job but
    one that routing skipped (skipped before any attempt)."""
    return not (latest.state == JobState.SKIPPED and latest.attempts == 0)


def reprocess(
    db: Database,
    study_uid: str,
    spool_root: Path,
    t: float,
    skip_reasons: Callable[[Session, AbstractSet[str]], dict[str, str]] = lambda s, series: {},
) -> list[Job]:
    """Analyse the study's routed series again from the spool: one new job per series,
    queued, or skipped where `skip_reasons` (given the routed series) gives the reason: one
    reconstruction of each scan (`completion.quiet.reprocess_study`), also where the other
    was analysed only because the one chosen got no results.

    The newest job of each series gives way to the new one as after a late instance
    (superseded; its results stay in the outbox and the PACS, its undelivered ones are
    cancelled). Refused (JobConflict) while the study is being received or a job of it is
    queued or running, and (NotInSpool) once retention removed any of its instance files."""
    with db.session() as s:
        latest = _routed_series(s, study_uid)
        paths = {
            series: list(s.scalars(select(Instance.path).where(Instance.series_uid == series)))
            for series in latest
        }
    for rels in paths.values():  # outside the transaction: a stat per file
        missing = sum(not (spool_root / rel).is_file() for rel in rels)
        if not rels or missing:
            raise NotInSpool(
                f"{f'{missing} of {len(rels)}' if rels and missing < len(rels) else 'all'} instance files "
                "of a routed series are no longer in the spool (retention removes them after "
                "retention.spool_days); send the study to nodal again to analyse it"
            )
    with db.session() as s:
        again = _routed_series(s, study_uid)
        if {k: j.id for k, j in again.items()} != {k: j.id for k, j in latest.items()}:
            raise JobConflict("the study's jobs changed meanwhile; reload and try again")
        skips = skip_reasons(s, set(again))
        created = []
        for series, old in again.items():
            skip = skips.get(series)
            job = Job(
                study_uid=study_uid,
                series_uid=series,
                state=JobState.QUEUED if skip is None else JobState.SKIPPED,
                rule=old.rule,
                reason=skip,
                created_at=t,
                not_before=t,
                finished_at=None if skip is None else t,
                reply_ae=old.reply_ae,
                instance_count=len(paths[series]),
            )
            s.add(job)
            s.flush()
            supersede_older(s, job, t)
            if skip is not None and (row := s.get(Series, series)) is not None:
                row.routing = skip  # as completion words it
            created.append(job)
            log.info(
                "job %d %s to reprocess the series of job %d%s",
                job.id,
                job.state,
                old.id,
                "" if skip is None else f" ({skip})",
            )
        return created


def reprocess_summary(jobs: list[Job]) -> str:
    """`job(s) #4, #5 queued` and, where reprocessing skipped a series again, `#6 skipped`."""
    parts = []
    for state in (JobState.QUEUED, JobState.SKIPPED):
        ids = [f"#{j.id}" for j in jobs if j.state == state]
        if ids:
            parts.append(f"{', '.join(ids)} {state}")
    return "job(s) " + ", ".join(parts)


def reprocess_refusal(purged: bool, waiting: bool, jobs: list[Job]) -> str | None:
    """Why the study of `jobs` (all of them, oldest first) cannot be reprocessed now, or None."""
    if purged:
        return (
            "the study's instances are no longer in the spool (retention removed them); "
            "send the study to nodal again to analyse it"
        )
    if waiting:
        return "the study is still being received; it is analysed once it is complete"
    latest = {j.series_uid: j for j in jobs}
    busy = [j for j in latest.values() if j.state in (JobState.QUEUED, JobState.RUNNING)]
    if busy:
        return f"job {busy[0].id} of this study is {busy[0].state}; wait until it has finished"
    if not any(routed(j) for j in latest.values()):
        return "no series of this study was routed for analysis; there is nothing to reprocess"
    return None


def _routed_series(s: Session, study_uid: str) -> dict[str, Job]:
    """The newest job of each routed series of a study that can be reprocessed now."""
    study = s.get(Study, study_uid)
    if study is None:
        raise KeyError(study_uid)
    jobs = list(s.scalars(select(Job).where(Job.study_uid == study_uid).order_by(Job.id)))
    why = reprocess_refusal(study.purged_at is not None, study.pending, jobs)
    if why is not None:
        raise (NotInSpool if study.purged_at is not None else JobConflict)(why)
    latest = {j.series_uid: j for j in jobs}
    return {series: job for series, job in latest.items() if routed(job)}


def is_final(state: str) -> bool:
    return state in FINAL_JOB_STATES
