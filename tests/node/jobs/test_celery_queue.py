"""The Celery dispatcher in `nodal serve`: which jobs it announces and when (kombu's in-memory
transport as the broker, so the messages are real Celery messages, read back here)."""

from __future__ import annotations

import os

import pytest

from dicom_node.index.db import Database, Job, JobState
from dicom_node.jobs.celery_backend import TASK, Dispatcher
from dicom_node.jobs.embedded import run_next
from dicom_node.jobs.table import claim, finish_error
from tests.helpers.node import settings

FUTURE = 5e9  # job 3 falls due in 2128


@pytest.fixture
def dispatcher(tmp_path):
    s = settings(
        queue={"backend": "celery", "broker_url": "memory://", "queue_name": f"q-{tmp_path.name}"},
        jobs={"max_attempts": 3, "retry_delay_seconds": 10},
        node={"data_dir": str(tmp_path)},
    )
    db = Database(f"sqlite:///{tmp_path / 'i.sqlite3'}")
    with db.session() as session:
        for i, not_before in ((1, 0.0), (2, 0.0), (3, FUTURE)):
            session.add(
                Job(id=i, study_uid="1.2", series_uid=f"1.2.{i}", created_at=0.0, not_before=not_before)
            )
    d = Dispatcher(s, db)
    yield d
    db.close()


def announced(d: Dispatcher) -> list[int]:
    """Drain the queue: the job ids of the `nodal.run_job` messages in it."""
    ids = []
    with d.app.connection_for_read() as conn, conn.SimpleQueue(d.settings.queue.queue_name) as q:
        while True:
            try:
                msg = q.get(timeout=0.2)
            except q.Empty:
                return ids
            assert msg.headers["task"] == TASK
            ids.append(msg.decode()[0][0])
            msg.ack()


def test_due_jobs_announced_once_then_again_when_unclaimed_too_long(dispatcher):
    d = dispatcher
    assert d.publish_due(100.0) == [1, 2]  # job 3 is not due yet
    assert announced(d) == [1, 2]
    assert d.publish_due(101.0) == []  # announced recently
    assert d.publish_due(100.0 + d.settings.queue.republish_seconds + 1) == [1, 2]  # messages lost?
    assert d.publish_due(FUTURE + 1) == [1, 2, 3]  # in the order they fell due
    assert d.ready()  # the broker answers


def test_a_duplicate_message_is_harmless_and_a_requeued_job_is_announced_again(dispatcher):
    d = dispatcher
    d.publish_due(100.0)
    job = claim(d.db, "host:1:celery-a", 60, 100.5, job_id=2)
    assert (job.id, job.worker, job.published_at) == (2, "host:1:celery-a", None)
    assert claim(d.db, "host:2:celery-b", 60, 100.6, job_id=2) is None  # duplicate delivery
    assert run_next(d.db, d.settings, "host:2:celery-b", model=None, job_id=2) is None
    assert run_next(d.db, d.settings, "host:2:celery-b", model=None, job_id=3) is None  # not due
    # the attempt fails: re-queued with a backoff, announced again once due, not before
    finish_error(d.db, 2, "host:1:celery-a", "boom", d.settings, 101.0, None)
    assert d.publish_due(102.0) == []
    assert d.publish_due(111.0) == [2]
    with d.db.session() as s:
        assert s.get(Job, 2).state == JobState.QUEUED and s.get(Job, 2).attempts == 1


def test_nodal_worker_binds_its_gpu_and_refuses_an_outdated_index(tmp_path, monkeypatch, caplog):
    from sqlalchemy import create_engine

    from dicom_node.index import schema
    from dicom_node.jobs.celery_backend import run_worker

    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    schema.upgrade(create_engine(url), schema.FIRST_REVISION)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    s = settings(queue={"backend": "celery", "broker_url": "memory://"}, index={"url": url})
    assert run_worker(s, gpu=3) == 2  # before loading a model or touching the broker
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert "run `nodal db upgrade`" in caplog.text
