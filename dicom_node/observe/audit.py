"""The audit trail: who sent what, which job processed it, where the results went.

IHE ATNA-style events (after DICOM PS3.15 A.5), kept in the index table `audit_events`.
This module only inserts and reads; nothing in nodal updates or deletes an audit row, and
on SQLite triggers refuse it. No patient data is recorded: studies appear as a `study_key`
(a short hash of the Study Instance UID, the same key the logs use), never as the UID.

Events:
- `association`: a DIMSE association accepted or rejected (calling AE, peer address, reason)
- `instances_stored`: instances acknowledged for one study over one association or STOW-RS
  request (count, study key, receiver, calling AE, peer)
- `job_finished`: a job reached a final state (job id, study key, state, findings)
- `results_transferred`: result instances of a job sent to a destination (count, outcome)
- `config_loaded`: `nodal serve` started with a configuration (its hash, secrets masked)
- `application_stop`: `nodal serve` stopped
- `user_action`: a retry of a job or a reprocess of a study, asked for on the status page or
  through the API, or `POST /api/retrieve` (detail `action: retrieve`), accepted or refused
- `query`: nodal asked a PACS (C-FIND, QIDO-RS): destination, operation, matches, outcome
- `retrieve`: nodal fetched instances from a PACS (C-GET, C-MOVE, WADO-RS) for a prior or
  for `POST /api/retrieve`: destination, operation, instances, outcome
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

from sqlalchemy import insert, select

from dicom_node.index.db import AuditEvent, Database, now

log = logging.getLogger("nodal.audit")

EVENTS = (
    "association",
    "authentication",
    "instances_stored",
    "job_finished",
    "results_transferred",
    "config_loaded",
    "application_stop",
    "user_action",
    "query",
    "retrieve",
)
SUCCESS, FAILURE = "success", "failure"


def study_key(study_uid: str) -> str:
    """A stable, non-identifying key for a study in logs and the audit trail."""
    return hashlib.sha256(study_uid.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Event:
    event: str
    outcome: str = SUCCESS
    actor: str = ""
    peer: str = ""
    study_key: str | None = None
    job_id: int | None = None
    count: int | None = None
    detail: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.event not in EVENTS:
            raise ValueError(f"unknown audit event {self.event!r}; one of {', '.join(EVENTS)}")


def record(db: Database, ev: Event, t: float | None = None) -> None:
    """Append one event. An audit write that fails is logged, never raised into the caller."""
    try:
        with db.session() as s:
            s.execute(
                insert(AuditEvent).values(
                    at=now() if t is None else t,
                    event=ev.event,
                    outcome=ev.outcome,
                    actor=ev.actor[:64],
                    peer=ev.peer[:64],
                    study_key=ev.study_key,
                    job_id=ev.job_id,
                    count=ev.count,
                    detail=json.dumps(ev.detail, sort_keys=True),
                )
            )
    except Exception as e:
        log.error("could not write the audit event %s: %s", ev.event, type(e).__name__)


def user_action(
    db: Database,
    action: str,
    via: str,
    outcome: str,
    result: str,
    peer: str,
    job_id: int | None = None,
    study_uid: str | None = None,
    count: int | None = None,
    extra: dict | None = None,
) -> None:
    """A `user_action` event: `action` (retry, reprocess, retrieve) asked for `via` the
    status page or the API by `peer`; the study by its key, never its UID; `extra` adds to
    the detail (the HTTP status of a retrieve)."""
    record(
        db,
        Event(
            "user_action",
            outcome,
            actor=via,
            peer=peer,
            study_key=None if study_uid is None else study_key(study_uid),
            job_id=job_id,
            count=count,
            detail={"action": action, "via": via, "result": result, **(extra or {})},
        ),
    )


def query(db: Database, event: str | None = None, since: float | None = None, limit: int = 100) -> list[dict]:
    """Events newest first, optionally of one kind and at or after `since` (epoch seconds)."""
    q = select(AuditEvent)
    if event:
        q = q.where(AuditEvent.event == event)
    if since is not None:
        q = q.where(AuditEvent.at >= since)
    with db.session() as s:
        rows = s.scalars(q.order_by(AuditEvent.id.desc()).limit(limit)).all()
    return [
        {
            "id": r.id,
            "at": r.at,
            "event": r.event,
            "outcome": r.outcome,
            "actor": r.actor,
            "peer": r.peer,
            "study_key": r.study_key,
            "job_id": r.job_id,
            "count": r.count,
            "detail": json.loads(r.detail) if r.detail else {},
        }
        for r in rows
    ]


def config_hash(settings) -> str:
    """SHA-256 of the effective configuration as `nodal config` prints it (secrets masked)."""
    return hashlib.sha256(settings.model_dump_json().encode()).hexdigest()
