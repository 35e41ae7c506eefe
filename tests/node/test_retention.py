"""Retention deletes patient data: only what nobody needs any more, oldest first under disk
pressure, and the index keeps the rows, marked purged."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import select, update

from dicom_node import retention
from dicom_node.index.db import Delivery, DeliveryState, Instance, Job, JobState, Study
from dicom_node.jobs.table import claim, finish_done, finish_error
from dicom_node.receive.contract import Source
from dicom_node.retention import purge
from tests.helpers.dicom import part10
from tests.helpers.node import complete, later, outcome, settings

DAY = 86400.0
OWNER = "h:1:w0"


@pytest.fixture
def plenty_of_space(monkeypatch):
    monkeypatch.setattr(retention, "_free_gb", lambda path: 1e6)


def retained(**over):
    return settings(retention={"spool_days": 7, "outbox_days": 7, "min_free_gb": 10, **over})


def arrive(receiver, study: str, n: int = 4, first: int = 1) -> str:
    """`n` instances of one series of `study`; returns the series UID."""
    series = f"{study}.1"
    for i in range(first, first + n):
        receiver.store_bytes(
            part10(sop=f"{series}.{i}", study=study, series=series), Source("dimse", "a1", "CT1")
        )
    receiver.flush()
    return series


def processed(node, study: str, t: float, s, delivered: bool = True) -> int:
    """`study` received, completed and its job done, all dated `t`, results in the outbox."""
    db, receiver, tmp = node
    arrive(receiver, study)
    complete(db, s)
    job = claim(db, OWNER, 10, later(), None)
    assert job is not None and job.study_uid == study
    assert finish_done(db, job.id, OWNER, outcome(job.id), s, later())
    aged(db, study, t)
    folder = tmp / "outbox" / f"job-{job.id}"
    folder.mkdir(parents=True)
    (folder / "sr.dcm").write_bytes(b"result")
    if delivered:
        with db.session() as ses:
            ses.execute(
                update(Delivery).where(Delivery.job_id == job.id).values(state=DeliveryState.DELIVERED)
            )
    return job.id


def aged(db, study: str, t: float) -> None:
    """Date the completion of `study` and the end of its finished jobs `t`."""
    with db.session() as ses:
        ses.execute(update(Study).where(Study.study_uid == study).values(completed_at=t))
        ses.execute(
            update(Job).where(Job.study_uid == study, Job.finished_at.is_not(None)).values(finished_at=t)
        )


def spool_folder(node, study: str) -> Path:
    return node[1].spool.root / study


def test_old_processed_data_goes_and_the_rows_stay_marked(node, plenty_of_space) -> None:
    db, _, tmp = node
    s = retained()
    t = time.time() - 10 * DAY
    job_id = processed(node, "1.2.3", t, s)
    assert spool_folder(node, "1.2.3").is_dir()
    assert purge(db, node[1].spool.root, tmp / "outbox", s, time.time()) == (1, 1)
    assert not spool_folder(node, "1.2.3").exists()
    assert not (tmp / "outbox" / f"job-{job_id}").exists()
    with db.session() as ses:
        study = ses.get(Study, "1.2.3")
        assert study.purged_at is not None and study.instance_count == 0
        assert not ses.scalars(select(Instance).where(Instance.study_uid == "1.2.3")).all()
        job = ses.get(Job, job_id)
        assert job.results_purged_at is not None and job.state == JobState.DONE  # history stays
    assert purge(db, node[1].spool.root, tmp / "outbox", s, time.time()) == (0, 0)  # once only


def test_recent_data_stays(node, plenty_of_space) -> None:
    db, _, tmp = node
    s = retained()
    job_id = processed(node, "1.2.3", time.time() - 6 * DAY, s)
    assert purge(db, node[1].spool.root, tmp / "outbox", s, time.time()) == (0, 0)
    assert spool_folder(node, "1.2.3").is_dir() and (tmp / "outbox" / f"job-{job_id}").is_dir()


def test_nothing_pending_queued_running_or_undelivered_is_deleted(node, monkeypatch) -> None:
    """Even with the disk full, old data that is still needed stays."""
    db, receiver, tmp = node
    monkeypatch.setattr(retention, "_free_gb", lambda path: 0.0)
    s = retained()
    old = time.time() - 30 * DAY
    undelivered = processed(node, "1.2.10", old, s, delivered=False)
    arrive(receiver, "1.2.12")
    arrive(receiver, "1.2.13")
    complete(db, s)  # both queued
    running = claim(db, OWNER, 10, later(), None)  # one of them running
    assert running is not None and running.study_uid in ("1.2.12", "1.2.13")
    aged(db, "1.2.12", old)
    aged(db, "1.2.13", old)
    arrive(receiver, "1.2.11")  # pending: received, not yet complete
    with db.session() as ses:
        ses.execute(update(Study).where(Study.study_uid == "1.2.11").values(last_received_at=old))
    assert purge(db, receiver.spool.root, tmp / "outbox", s, time.time()) == (1, 0)
    # the one study purged is the one whose job is done: its results wait for delivery
    assert not spool_folder(node, "1.2.10").exists()
    assert (tmp / "outbox" / f"job-{undelivered}").is_dir()
    for study in ("1.2.11", "1.2.12", "1.2.13"):
        assert spool_folder(node, study).is_dir(), study
    with db.session() as ses:
        assert {d.state for d in ses.scalars(select(Delivery).where(Delivery.job_id == undelivered))} == {
            DeliveryState.PENDING
        }


def test_a_study_with_late_instances_waits_for_its_new_job(node, plenty_of_space) -> None:
    db, receiver, tmp = node
    s = retained()
    old = time.time() - 10 * DAY
    processed(node, "1.2.3", old, s)
    arrive(receiver, "1.2.3", n=1, first=20)  # a late instance: the study is pending again
    assert purge(db, receiver.spool.root, tmp / "outbox", s, time.time())[0] == 0
    assert spool_folder(node, "1.2.3").is_dir()


def test_under_disk_pressure_the_oldest_goes_first_until_there_is_space(node, monkeypatch) -> None:
    db, receiver, tmp = node
    s = retained()
    now = time.time()
    jobs = {
        study: processed(node, study, now - age * 3600, s)
        for study, age in (("1.2.5", 3), ("1.2.6", 1), ("1.2.7", 2))
    }
    deleted: list[str] = []
    real_rmtree = retention.shutil.rmtree

    def rmtree(path, ignore_errors=False):
        deleted.append(Path(path).name)
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(retention.shutil, "rmtree", rmtree)
    # space comes back after two studies and two result folders are gone
    monkeypatch.setattr(retention, "_free_gb", _space_after(deleted, studies=2, results=2))
    assert purge(db, receiver.spool.root, tmp / "outbox", s, now) == (2, 2)
    assert deleted == ["1.2.5", "1.2.7", f"job-{jobs['1.2.5']}", f"job-{jobs['1.2.7']}"]  # oldest first
    assert spool_folder(node, "1.2.6").is_dir() and (tmp / "outbox" / f"job-{jobs['1.2.6']}").is_dir()


def _space_after(deleted: list[str], studies: int, results: int):
    """Free space that is short until `studies` spool folders (then `results` outbox folders)
    were deleted."""

    def free_gb(path: Path) -> float:
        gone_studies = sum(1 for d in deleted if not d.startswith("job-"))
        gone_results = sum(1 for d in deleted if d.startswith("job-"))
        if Path(path).name == "outbox":
            return 50.0 if gone_results >= results else 0.0
        return 50.0 if gone_studies >= studies else 0.0

    return free_gb


def test_failed_jobs_results_go_too(node, plenty_of_space) -> None:
    """A job that failed has no deliveries; its study and any results go on schedule."""
    db, receiver, tmp = node
    s = retained()
    old = time.time() - 10 * DAY
    arrive(receiver, "1.2.3")
    complete(db, s)
    job = claim(db, OWNER, 10, later(), None)
    finish_error(db, job.id, OWNER, "broken", s, later(), JobState.FAILED)
    aged(db, "1.2.3", old)
    assert purge(db, receiver.spool.root, tmp / "outbox", s, time.time())[0] == 1
    assert not spool_folder(node, "1.2.3").exists()
