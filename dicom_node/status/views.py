"""What the status page shows, as plain values read from the index.

Each function takes the database (and a time) and returns dicts and lists of plain values;
the router renders them as HTML or JSON. A study is labelled by its accession number; its
patient's name and ID are added only with `show_patient` (`status_page.show_patient`; the
index holds them only then). Every query is bounded (one page of studies, a few recent
refusals) so that the page stays fast with a large index.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from sqlalchemy import func, select

from dicom_node.index.db import AuditEvent, Database, Delivery, Instance, Job, JobState, Series, Study
from dicom_node.jobs.table import reprocess_refusal

REFUSAL_EVENTS = ("association", "authentication")


def iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def live(db: Database, t: float, window_seconds: float) -> dict:
    """Figures that move: instances received lately, the queue, the deliveries waiting."""
    with db.session() as s:
        recent = s.scalar(
            select(func.count()).select_from(Instance).where(Instance.received_at >= t - window_seconds)
        )
        by_state = dict(
            s.execute(
                select(Job.state, func.count())
                .where(Job.state.in_((JobState.QUEUED, JobState.RUNNING)))
                .group_by(Job.state)
            ).all()
        )
        oldest = s.scalar(select(func.min(Job.created_at)).where(Job.state == JobState.QUEUED))
        deliveries = dict(
            s.execute(
                select(Delivery.state, func.count())
                .where(Delivery.state.in_(("pending", "failed")))
                .group_by(Delivery.state)
            ).all()
        )
        studies = s.scalar(select(func.count()).select_from(Study))
    return {
        "at": iso(t),
        "window_minutes": round(window_seconds / 60, 1),
        "instances_recent": recent or 0,
        "queued": by_state.get(JobState.QUEUED, 0),
        "running": by_state.get(JobState.RUNNING, 0),
        "oldest_waiting_seconds": None if oldest is None else round(t - oldest),
        "deliveries_pending": deliveries.get("pending", 0),
        "deliveries_failed": deliveries.get("failed", 0),
        "studies": studies or 0,
    }


def _series_row(se: Series, jobs: list[Job]) -> dict:
    """A series with its last routing decision (the completion stage keeps the reason as text)."""
    latest = max((j for j in jobs if j.series_uid == se.series_uid), key=lambda j: j.id, default=None)
    routed = None if latest is None else latest.state != JobState.SKIPPED
    return {
        "series_instance_uid": se.series_uid,
        "modality": se.modality,
        "description": se.description,
        "instances": se.instance_count,
        "calling_ae": se.calling_ae,
        "routed": routed,
        "routing": se.routing or "not decided yet",
    }


def _job_row(j: Job) -> dict:
    seconds = json.loads(j.seconds) if j.seconds else None
    return {
        "id": j.id,
        "series_instance_uid": j.series_uid,
        "state": j.state,
        "rule": j.rule,
        "reason": j.reason,
        "last_error": j.last_error,
        "attempts": j.attempts,
        "findings": j.findings,
        "malignant": j.malignant,
        "created_at": iso(j.created_at),
        "started_at": iso(j.started_at),
        "finished_at": iso(j.finished_at),
        "seconds_total": None if not seconds else round(sum(float(v) for v in seconds.values()), 1),
        "seconds": seconds,
        "retryable": j.state in (JobState.DONE, JobState.FAILED, JobState.SKIPPED),
        # what became of the comparison with the prior study (jobs.outcome.FollowUp.to_json())
        "followup": json.loads(j.followup) if j.followup else None,
    }


def _delivery_summary(s, job_ids: list[int]) -> dict[int, dict[str, dict[str, int]]]:
    out: dict[int, dict[str, dict[str, int]]] = {}
    if not job_ids:
        return out
    rows = s.execute(
        select(Delivery.job_id, Delivery.destination, Delivery.state, func.count())
        .where(Delivery.job_id.in_(job_ids))
        .group_by(Delivery.job_id, Delivery.destination, Delivery.state)
    )
    for job_id, dest, state, n in rows:
        out.setdefault(job_id, {}).setdefault(dest, {})[state] = n
    return out


def delivery_state(counts: dict[str, int]) -> str:
    """One word for a destination: failed beats pending beats delivered."""
    for state in ("failed", "pending", "delivered", "cancelled"):
        if counts.get(state):
            return state
    return "none"


def study_labels(st: Study, show_patient: bool) -> dict:
    """Accession number, and patient name and ID only when they are to be shown."""
    labels = {"accession_number": st.accession_number}
    if show_patient:
        labels |= {"patient_name": st.patient_name, "patient_id": st.patient_id}
    return labels


def studies_page(db: Database, limit: int = 50, offset: int = 0, show_patient: bool = False) -> dict:
    """One page of studies, newest arrival first, with their series, jobs and deliveries."""
    with db.session() as s:
        total = s.scalar(select(func.count()).select_from(Study)) or 0
        studies = s.scalars(
            select(Study).order_by(Study.last_received_at.desc()).limit(limit).offset(offset)
        ).all()
        uids = [st.study_uid for st in studies]
        series: dict[str, list[Series]] = {}
        jobs: dict[str, list[Job]] = {}
        if uids:
            for se in s.scalars(select(Series).where(Series.study_uid.in_(uids))):
                series.setdefault(se.study_uid, []).append(se)
            for j in s.scalars(select(Job).where(Job.study_uid.in_(uids)).order_by(Job.id)):
                jobs.setdefault(j.study_uid, []).append(j)
        deliveries = _delivery_summary(s, [j.id for js in jobs.values() for j in js])
        rows = []
        for st in studies:
            st_jobs = [j for j in jobs.get(st.study_uid, []) if j.state != JobState.SUPERSEDED]
            dests: dict[str, dict[str, int]] = {}
            for j in st_jobs:
                for dest, counts in deliveries.get(j.id, {}).items():
                    acc = dests.setdefault(dest, {})
                    for state, n in counts.items():
                        acc[state] = acc.get(state, 0) + n
            rows.append(
                {
                    "study_instance_uid": st.study_uid,
                    **study_labels(st, show_patient),
                    "instances": st.instance_count,
                    "first_received_at": iso(st.first_received_at),
                    "last_received_at": iso(st.last_received_at),
                    "completed": st.completed_at is not None,
                    "waiting": st.pending,
                    "series": [
                        _series_row(se, jobs.get(st.study_uid, [])) for se in series.get(st.study_uid, [])
                    ],
                    "jobs": [_job_row(j) for j in st_jobs],
                    "findings": sum(j.findings or 0 for j in st_jobs),
                    "malignant": sum(j.malignant or 0 for j in st_jobs),
                    "deliveries": {d: {"state": delivery_state(c), **c} for d, c in sorted(dests.items())},
                }
            )
    return {"total": total, "limit": limit, "offset": offset, "studies": rows}


def study_detail(db: Database, study_uid: str, show_patient: bool = False) -> dict | None:
    """One study: its series and routing, every job, every delivered or failed result instance."""
    with db.session() as s:
        st = s.get(Study, study_uid)
        if st is None:
            return None
        all_jobs = s.scalars(select(Job).where(Job.study_uid == study_uid).order_by(Job.id)).all()
        job_rows = []
        for j in all_jobs:
            row = _job_row(j)
            row["superseded_by"] = j.superseded_by
            row["result_dir"] = j.result_dir
            row["results_purged"] = j.results_purged_at is not None
            row["deliveries"] = [
                {
                    "destination": d.destination,
                    "file": d.file.rsplit("/", 1)[-1],
                    "sop_class_uid": d.sop_class_uid,
                    "state": d.state,
                    "attempts": d.attempts,
                    "last_error": d.last_error,
                    "next_attempt_at": iso(d.next_attempt_at) if d.state == "pending" else None,
                    "delivered_at": iso(d.delivered_at),
                }
                for d in s.scalars(select(Delivery).where(Delivery.job_id == j.id).order_by(Delivery.id))
            ]
            failed = any(d["state"] == "failed" for d in row["deliveries"])
            row["retryable"] = j.state in (JobState.FAILED, JobState.SKIPPED) or (
                j.state == JobState.DONE and failed
            )
            job_rows.append(row)
        return {
            "study_instance_uid": st.study_uid,
            **study_labels(st, show_patient),
            "instances": st.instance_count,
            "first_received_at": iso(st.first_received_at),
            "last_received_at": iso(st.last_received_at),
            "completed_at": iso(st.completed_at),
            "waiting": st.pending,
            "purged": st.purged_at is not None,
            "reprocess_refusal": reprocess_refusal(st.purged_at is not None, st.pending, list(all_jobs)),
            "series": [
                _series_row(se, list(all_jobs))
                for se in s.scalars(select(Series).where(Series.study_uid == study_uid))
            ],
            "jobs": job_rows,
        }


def refusals(db: Database, limit: int = 20) -> list[dict]:
    """The latest refused associations and HTTP requests, newest first, with their reasons."""
    with db.session() as s:
        rows = s.scalars(
            select(AuditEvent)
            .where(AuditEvent.event.in_(REFUSAL_EVENTS), AuditEvent.outcome == "failure")
            .order_by(AuditEvent.id.desc())
            .limit(limit)
        ).all()
    out = []
    for r in rows:
        detail = json.loads(r.detail) if r.detail else {}
        reason = detail.get("reason") or detail.get("why") or ""
        what = " ".join(str(detail[k]) for k in ("method", "area") if detail.get(k))
        out.append(
            {
                "at": iso(r.at),
                "kind": "DIMSE association" if r.event == "association" else "HTTP request",
                "actor": r.actor,
                "peer": r.peer,
                "what": what,
                "reason": str(reason) if reason else json.dumps(detail, sort_keys=True),
            }
        )
    return out
