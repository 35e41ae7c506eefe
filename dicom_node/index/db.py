"""The index: studies, series, instances, jobs and deliveries (SQLAlchemy 2; SQLite by default,
PostgreSQL for scale-out; the schema is migrated by dicom_node.index.schema).

Times are seconds since the epoch (UTC), as floats. The spool is the source of truth for
received instances (`receive.reconcile` re-indexes files the index lost), so SQLite runs
in WAL mode with ``synchronous=NORMAL``: a crash of the process loses nothing, a power
loss may lose the last commits of the index but never an acknowledged file. Every
SQLite transaction starts with ``BEGIN IMMEDIATE`` so that concurrent writers (receiver
threads, worker processes) wait for each other instead of failing on a lock upgrade.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import (
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    or_,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

UID = String(64)
PATIENT_NAME_CHARS = 200  # PN: up to three component groups of 64 characters, with separators


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    SUPERSEDED = "superseded"


FINAL_JOB_STATES = (JobState.DONE, JobState.FAILED, JobState.SKIPPED, JobState.SUPERSEDED)


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    CANCELLED = "cancelled"  # the job was superseded before this result went out


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"

    study_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    first_received_at: Mapped[float] = mapped_column(Float)
    last_received_at: Mapped[float] = mapped_column(Float, index=True)  # the status page's order
    released_at: Mapped[float | None] = mapped_column(Float, default=None)
    pending: Mapped[bool] = mapped_column(Boolean, default=True, index=True)
    completed_at: Mapped[float | None] = mapped_column(Float, default=None)
    completions: Mapped[int] = mapped_column(Integer, default=0)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    purged_at: Mapped[float | None] = mapped_column(Float, default=None)
    # from the latest instance that carries them; the patient's only with status_page.show_patient
    accession_number: Mapped[str | None] = mapped_column(String(16), default=None)
    patient_name: Mapped[str | None] = mapped_column(String(PATIENT_NAME_CHARS), default=None)
    patient_id: Mapped[str | None] = mapped_column(String(64), default=None)


class Series(Base):
    __tablename__ = "series"

    series_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    study_uid: Mapped[str] = mapped_column(ForeignKey("studies.study_uid"), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    sop_class_uid: Mapped[str] = mapped_column(UID, default="")
    image_type: Mapped[str] = mapped_column(String(128), default="")  # values joined by "\"
    slice_thickness_mm: Mapped[float | None] = mapped_column(Float, default=None)
    description: Mapped[str] = mapped_column(String(64), default="")
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    frame_count: Mapped[int] = mapped_column(Integer, default=0)
    pending: Mapped[bool] = mapped_column(Boolean, default=True)
    last_received_at: Mapped[float] = mapped_column(Float)
    calling_ae: Mapped[str] = mapped_column(String(16), default="")  # who sent the latest instance
    routing: Mapped[str | None] = mapped_column(Text, default=None)  # last decision, for the API
    # which scan this series reconstructs (completion.reconstructions): its frame of reference,
    # the first and last acquisition time of its instances (seconds), its convolution kernel,
    # the span of its slices along their normal (mm); NULL when its instances do not say (and
    # for series indexed before revision 0007)
    frame_of_reference_uid: Mapped[str | None] = mapped_column(UID, default=None)
    acquired_from: Mapped[float | None] = mapped_column(Float, default=None)
    acquired_to: Mapped[float | None] = mapped_column(Float, default=None)
    kernel: Mapped[str | None] = mapped_column(String(64), default=None)
    extent_from: Mapped[float | None] = mapped_column(Float, default=None)
    extent_to: Mapped[float | None] = mapped_column(Float, default=None)


class Instance(Base):
    __tablename__ = "instances"

    sop_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    series_uid: Mapped[str] = mapped_column(ForeignKey("series.series_uid"), index=True)
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(256))  # relative to the spool root
    size: Mapped[int] = mapped_column(Integer)
    frames: Mapped[int] = mapped_column(Integer, default=1)
    received_at: Mapped[float] = mapped_column(Float, index=True)  # the status page's recent count
    via: Mapped[str] = mapped_column(String(8))  # dimse | stow | recovered
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    peer_host: Mapped[str] = mapped_column(String(64), default="")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state_not_before", "state", "not_before"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    series_uid: Mapped[str] = mapped_column(UID, index=True)
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED)
    rule: Mapped[str | None] = mapped_column(String(64), default=None)
    reason: Mapped[str | None] = mapped_column(Text, default=None)  # why skipped / failed
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)
    not_before: Mapped[float] = mapped_column(Float, default=0.0)
    started_at: Mapped[float | None] = mapped_column(Float, default=None)
    finished_at: Mapped[float | None] = mapped_column(Float, default=None, index=True)
    lease_owner: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, default=None)
    superseded_by: Mapped[int | None] = mapped_column(Integer, default=None)
    reply_ae: Mapped[str] = mapped_column(String(16), default="")
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    findings: Mapped[int | None] = mapped_column(Integer, default=None)
    malignant: Mapped[int | None] = mapped_column(Integer, default=None)  # findings called malignant
    result_dir: Mapped[str | None] = mapped_column(String(256), default=None)  # relative to outbox
    seconds: Mapped[str | None] = mapped_column(Text, default=None)  # JSON: stage -> seconds
    results_purged_at: Mapped[float | None] = mapped_column(Float, default=None)
    worker: Mapped[str | None] = mapped_column(String(128), default=None)  # who claimed it last
    published_at: Mapped[float | None] = mapped_column(Float, default=None)  # announced on the queue
    followup: Mapped[str | None] = mapped_column(
        Text, default=None
    )  # JSON: the comparison with a prior (0006)


class Delivery(Base):
    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("job_id", "destination", "sop_uid"),
        Index("ix_deliveries_state_next", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    sop_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    file: Mapped[str] = mapped_column(String(256))  # relative to the outbox
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    next_attempt_at: Mapped[float] = mapped_column(Float, default=0.0)
    delivered_at: Mapped[float | None] = mapped_column(Float, default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)


class AuditEvent(Base):
    """One IHE ATNA-style audit event; rows are only ever inserted (see `dicom_node.observe.audit`)."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    event: Mapped[str] = mapped_column(String(32), index=True)
    outcome: Mapped[str] = mapped_column(String(16))  # success | failure
    actor: Mapped[str] = mapped_column(String(64), default="")  # calling AE, destination, "nodal"
    peer: Mapped[str] = mapped_column(String(64), default="")  # network address
    study_key: Mapped[str | None] = mapped_column(String(16), default=None)  # not the UID
    job_id: Mapped[int | None] = mapped_column(Integer, default=None)
    count: Mapped[int | None] = mapped_column(Integer, default=None)
    detail: Mapped[str] = mapped_column(Text, default="")


class Heartbeat(Base):
    """One row the readiness probe writes, to prove the index takes writes."""

    __tablename__ = "heartbeat"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[float] = mapped_column(Float)


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite files get WAL, a busy timeout and BEGIN IMMEDIATE."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


class Database:
    """The engine and a session factory; `Database.session()` is one transaction."""

    def __init__(self, url: str, upgrade: bool = True):
        """`upgrade`: migrate the schema to the newest revision; False: refuse an outdated one."""
        from dicom_node.index import schema

        self.engine = make_engine(url)
        if upgrade:
            schema.upgrade(self.engine)
        else:
            schema.require_current(self.engine)
        self._factory = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._factory() as s, s.begin():
            yield s

    def close(self) -> None:
        self.engine.dispose()


def forget_patients(db: Database) -> int:
    """Erase every stored patient name and ID (`status_page.show_patient` off); returns how
    many studies had one."""
    with db.session() as s:
        return s.execute(  # type: ignore[attr-defined]
            update(Study)
            .where(or_(Study.patient_name.is_not(None), Study.patient_id.is_not(None)))
            .values(patient_name=None, patient_id=None)
        ).rowcount


def now() -> float:
    return time.time()
