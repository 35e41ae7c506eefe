"""Worker supervision: a job past its time limit is stopped; shutdown re-queues what is still running."""

import time

import pytest

from dicom_node.index.db import Database, Job, JobState
from dicom_node.jobs.embedded import WorkerPool
from dicom_node.jobs.table import claim, owner_id
from dicom_node.receive.receiver import Receiver
from dicom_node.spool.store import Spool
from tests.helpers.node import complete, later, receive, settings


class FakeProcess:
    """Stands in for a worker process that hangs in its job."""

    def __init__(self, pid=424242):
        self.pid = pid
        self.alive = True
        self.exitcode = None

    def is_alive(self):
        return self.alive

    def kill(self):
        self.alive, self.exitcode = False, -9

    def join(self, timeout=None):
        pass


@pytest.fixture
def pool_with_running_job(tmp_path, monkeypatch):
    db = Database(f"sqlite:///{tmp_path / 'i.sqlite3'}")
    spool = Spool(tmp_path / "spool")
    s = settings(jobs={"workers": 1, "time_limit_seconds": 5, "max_attempts": 3, "retry_delay_seconds": 1})
    receiver = Receiver(spool, db)
    receive(receiver)
    receiver.close()
    complete(db, s)
    proc = FakeProcess()
    job = claim(db, owner_id("w0", proc.pid), 60, later())
    pool = WorkerPool(s, db)
    spawned = []
    monkeypatch.setattr(pool, "_spawn", spawned.append)
    slot = pool._slots[0]
    slot.process, slot.job_id.value, slot.started.value = proc, job.id, time.time()
    yield pool, db, job.id, proc, spawned
    spool.close()
    db.close()


def test_job_past_its_time_limit_is_stopped_and_retried(pool_with_running_job):
    pool, db, job_id, proc, spawned = pool_with_running_job
    pool.supervise()
    assert proc.alive and not spawned  # within the limit
    pool._slots[0].started.value = time.time() - 10
    pool.supervise()
    assert not proc.alive and spawned == [0]  # stopped and replaced
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job.state == JobState.QUEUED and "time limit of 5 s exceeded" in job.last_error


def test_shutdown_requeues_a_job_that_does_not_finish_in_the_grace_period(pool_with_running_job):
    pool, db, job_id, proc, _ = pool_with_running_job
    pool.stop(grace_seconds=0.1)
    assert not proc.alive
    with db.session() as s:
        job = s.get(Job, job_id)
        assert (
            job.state == JobState.QUEUED and job.attempts == 0 and job.last_error == "re-queued at shutdown"
        )
