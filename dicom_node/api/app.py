"""The HTTP side of `nodal serve`: the REST API, health, and the STOW-RS receiver.

- `GET /api/jobs?state=&study=&limit=&offset=`: jobs, newest first
- `GET /api/jobs/{id}`: one job with its result files and per-destination deliveries
- `POST /api/jobs/{id}/retry`: run a finished job again, or re-send its failed deliveries
- `GET /api/studies?limit=&offset=`, `GET /api/studies/{uid}`: studies (with their accession
  numbers), their series and routing decisions
- `POST /api/studies/{uid}/reprocess`: analyse the study's routed series again from the spool
  (new jobs; audited as a `user_action`)
- `POST /api/retrieve`: fetch a study from the PACS and analyse it, with its prior (`api.retrieve`)
- `GET /api/audit?event=&since=&limit=`: the audit trail, newest first (`dicom_node.observe.audit`)
- `GET /healthz`, `GET /readyz`, `GET /metrics`: the monitoring router (`dicom_node.observe.probes`)
- `GET /` and `/status/...`: the status page (`dicom_node.status.router`; `status_page` settings)

With a token configured (`node.http_auth`), everything but the probes (and `/metrics`)
needs `Authorization: Bearer <token>` (`dicom_node.api.auth`); the status page also takes
the session cookie its login form sets (`dicom_node.status.session`).

Thin endpoints over `jobs` and the index; no patient name or ID is returned (UIDs, accession
numbers, counts, states, reasons and times only). Times are ISO 8601 UTC.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from fastapi import FastAPI, HTTPException, Query, Request
from sqlalchemy import func, select

from dicom_node.api.auth import BearerAuth, http_token
from dicom_node.api.retrieve import retrieve_router
from dicom_node.completion.quiet import reprocess_study
from dicom_node.config import Settings
from dicom_node.index.db import Database, Delivery, Job, Series, Study, now
from dicom_node.jobs.embedded import WorkerPool
from dicom_node.jobs.table import JobConflict, reprocess_summary, retry
from dicom_node.observe import audit
from dicom_node.observe.probes import Probes, monitoring_router
from dicom_node.receive.http_limits import UploadGuard
from dicom_node.receive.receiver import Receiver
from dicom_node.receive.stow import stow_router
from dicom_node.status.router import status_router
from dicom_node.status.session import Sessions


def iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def job_json(job: Job, deliveries: list[Delivery] | None = None) -> dict:
    out = {
        "id": job.id,
        "state": job.state,
        "study_instance_uid": job.study_uid,
        "series_instance_uid": job.series_uid,
        "rule": job.rule,
        "reason": job.reason,
        "last_error": job.last_error,
        "attempts": job.attempts,
        "worker": job.worker,
        "instances": job.instance_count,
        "findings": job.findings,
        "superseded_by": job.superseded_by,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "seconds": json.loads(job.seconds) if job.seconds else None,
        "followup": json.loads(job.followup) if job.followup else None,  # issue 17
    }
    if deliveries is not None:
        out["result_dir"] = job.result_dir
        out["results_purged"] = job.results_purged_at is not None
        out["deliveries"] = _deliveries(deliveries)
    return out


def _deliveries(rows: list[Delivery]) -> dict:
    by_dest: dict[str, dict] = {}
    for d in rows:
        dest = by_dest.setdefault(
            d.destination, {"delivered": 0, "pending": 0, "failed": 0, "cancelled": 0, "instances": []}
        )
        dest[d.state] += 1
        dest["instances"].append(
            {
                "file": d.file.rsplit("/", 1)[-1],
                "sop_instance_uid": d.sop_uid,
                "state": d.state,
                "attempts": d.attempts,
                "last_error": d.last_error,
                "next_attempt_at": iso(d.next_attempt_at) if d.state == "pending" else None,
                "delivered_at": iso(d.delivered_at),
            }
        )
    return by_dest


def study_json(study: Study, jobs: dict[str, int]) -> dict:
    return {
        "study_instance_uid": study.study_uid,
        "accession_number": study.accession_number,
        "instances": study.instance_count,
        "pending": study.pending,
        "first_received_at": iso(study.first_received_at),
        "last_received_at": iso(study.last_received_at),
        "completed_at": iso(study.completed_at),
        "completions": study.completions,
        "purged": study.purged_at is not None,
        "jobs": jobs,
    }


def create_app(
    settings: Settings,
    db: Database,
    receiver: Receiver,
    ready: Callable[[], bool],
    ready_check: tuple[str, str] = WorkerPool.READY_CHECK,
) -> FastAPI:
    app = FastAPI(title="nodal", summary="DICOM AI node: lymph nodes on CT", version="0.1.0")
    app.include_router(stow_router(receiver))
    app.include_router(retrieve_router(settings, db, receiver))  # issue 17: POST /api/retrieve
    token = http_token(settings.node.http_auth)  # a wrong token file stops start-up first
    checks = probes(settings, db, receiver, ready, ready_check)
    app.include_router(monitoring_router(checks))
    sessions = Sessions(token)
    if settings.status_page.enabled:
        app.include_router(status_router(settings, db, checks, sessions, receiver.spool.root))
    app.add_middleware(UploadGuard, settings=settings.node.http_limits)  # inside BearerAuth
    if token:
        app.add_middleware(BearerAuth, token=token, db=db, sessions=sessions)
    else:
        logging.getLogger("nodal.auth").warning(
            "node.http_auth has no token: STOW-RS and the API answer anyone who can reach the HTTP port"
        )

    @app.get("/api/audit")
    def audit_events(
        event: str | None = None,
        since: str | None = Query(None, description="ISO 8601 time or epoch seconds"),
        limit: int = Query(100, ge=1, le=1000),
    ) -> dict:
        if event and event not in audit.EVENTS:
            raise HTTPException(400, f"unknown event {event!r}; one of {', '.join(audit.EVENTS)}")
        rows = audit.query(db, event, _parse_since(since), limit)
        for r in rows:
            r["at"] = iso(r["at"])
        return {"events": rows}

    @app.get("/api/jobs")
    def list_jobs(
        state: str | None = None,
        study: str | None = None,
        limit: int = Query(100, ge=1, le=1000),
        offset: int = Query(0, ge=0),
    ) -> dict:
        with db.session() as s:
            q = select(Job)
            if state:
                q = q.where(Job.state == state)
            if study:
                q = q.where(Job.study_uid == study)
            total = s.scalar(select(func.count()).select_from(q.subquery()))
            rows = s.scalars(q.order_by(Job.id.desc()).limit(limit).offset(offset)).all()
            return {"total": total, "jobs": [job_json(j) for j in rows]}

    @app.get("/api/jobs/{job_id}")
    def get_job(job_id: int) -> dict:
        with db.session() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise HTTPException(404, f"no job {job_id}")
            deliveries = s.scalars(
                select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.id)
            ).all()
            return job_json(job, list(deliveries))

    @app.post("/api/jobs/{job_id}/retry")
    def retry_job(job_id: int, request: Request) -> dict:
        client = request.client.host if request.client else "-"
        try:
            retry(db, job_id, settings, now())
        except KeyError:
            raise HTTPException(404, f"no job {job_id}") from None
        except JobConflict as e:
            audit.user_action(db, "retry", "api", audit.FAILURE, str(e), client, job_id=job_id)
            raise HTTPException(409, str(e)) from None
        audit.user_action(db, "retry", "api", audit.SUCCESS, "retry", client, job_id=job_id)
        return get_job(job_id)

    @app.get("/api/studies")
    def list_studies(limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)) -> dict:
        receiver.flush(timeout=2.0)
        with db.session() as s:
            total = s.scalar(select(func.count()).select_from(Study))
            studies = s.scalars(
                select(Study).order_by(Study.last_received_at.desc()).limit(limit).offset(offset)
            ).all()
            counts = _job_counts(s, [st.study_uid for st in studies])
            return {
                "total": total,
                "studies": [study_json(st, counts.get(st.study_uid, {})) for st in studies],
            }

    @app.get("/api/studies/{study_uid}")
    def get_study(study_uid: str) -> dict:
        receiver.flush(timeout=2.0)
        with db.session() as s:
            study = s.get(Study, study_uid)
            if study is None:
                raise HTTPException(404, "no such study")
            out = study_json(study, _job_counts(s, [study_uid]).get(study_uid, {}))
            out["series"] = [
                {
                    "series_instance_uid": se.series_uid,
                    "modality": se.modality,
                    "instances": se.instance_count,
                    "frames": se.frame_count,
                    "routing": se.routing,
                }
                for se in s.scalars(select(Series).where(Series.study_uid == study_uid))
            ]
            out["job_ids"] = list(
                s.scalars(select(Job.id).where(Job.study_uid == study_uid).order_by(Job.id))
            )
            return out

    # issue 18: the reprocess action (the status page's button does the same)
    @app.post("/api/studies/{study_uid}/reprocess")
    def reprocess_api(study_uid: str, request: Request) -> dict:
        client = request.client.host if request.client else "-"
        try:
            jobs = reprocess_study(db, study_uid, receiver.spool.root, settings.routing, now())
        except KeyError:
            raise HTTPException(404, "no such study") from None
        except JobConflict as e:
            audit.user_action(db, "reprocess", "api", audit.FAILURE, str(e), client, study_uid=study_uid)
            raise HTTPException(409, str(e)) from None
        audit.user_action(
            db,
            "reprocess",
            "api",
            audit.SUCCESS,
            reprocess_summary(jobs),
            client,
            study_uid=study_uid,
            count=len(jobs),
        )
        return {"study_instance_uid": study_uid, "jobs": [job_json(j) for j in jobs]}

    return app


def _job_counts(s, study_uids: list[str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    if not study_uids:
        return out
    rows = s.execute(
        select(Job.study_uid, Job.state, func.count())
        .where(Job.study_uid.in_(study_uids))
        .group_by(Job.study_uid, Job.state)
    )
    for uid, state, n in rows:
        out.setdefault(uid, {})[state] = n
    return out


def probes(
    settings: Settings,
    db: Database,
    receiver: Receiver,
    ready: Callable[[], bool],
    ready_check: tuple[str, str] = WorkerPool.READY_CHECK,
) -> Probes:
    return Probes(db, receiver.spool.tmp, settings.spool.min_free_mb * 2**20, ready, ready_check)


def _parse_since(since: str | None) -> float | None:
    if not since:
        return None
    try:
        return float(since)
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(since)
    except ValueError:
        raise HTTPException(400, f"since={since!r} is neither ISO 8601 nor epoch seconds") from None
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()
