"""Jobs: completion creates them, leases recover crashed work, supersede, retry; outbox re-sends failures."""

import time
from pathlib import Path

import pytest
from sqlalchemy import select

from dicom_node.completion.quiet import complete_due_studies
from dicom_node.delivery.outbox import backoff, deliver_due
from dicom_node.index.db import Delivery, DeliveryState, Job, JobState
from dicom_node.jobs.table import (
    JobConflict,
    claim,
    finish_done,
    finish_error,
    renew,
    requeue_lost,
    retry,
)
from tests.helpers.node import FakeSender, complete, done_job, later, outcome, receive, settings

CT = "1.2.840.10008.5.1.4.1.1.2"


def test_completion_queues_selected_series_and_records_skips(node):
    db, receiver, _ = node
    s = settings()
    receive(receiver)
    receive(receiver, n=1, series="1.2.3.5", description="Topogram")
    assert complete_due_studies(db, s, set(), time.time()) == []  # still within the quiet period
    created = complete(db, s)
    with db.session() as ses:
        jobs = {j.series_uid: j for j in ses.scalars(select(Job))}
    assert sorted(created) == sorted(j.id for j in jobs.values())
    assert jobs["1.2.3.4"].state == JobState.QUEUED and jobs["1.2.3.4"].reply_ae == "CT1"
    assert jobs["1.2.3.5"].state == JobState.SKIPPED and "1 slices, fewer than 3" in jobs["1.2.3.5"].reason
    assert complete(db, s) == []  # nothing new: no new job


def test_late_instances_supersede_and_cancel_undelivered_results(node):
    db, receiver, _ = node
    s = settings()
    receive(receiver)
    complete(db, s)
    job = claim(db, "h:1:w0", 10, later())
    assert finish_done(db, job.id, "h:1:w0", outcome(job.id), s, time.time())
    receive(receiver, n=2, first=10)  # late instances of the same series
    [new_id] = complete(db, s)
    with db.session() as ses:
        old = ses.get(Job, job.id)
        assert old.state == JobState.SUPERSEDED and old.superseded_by == new_id
        states = {d.state for d in ses.scalars(select(Delivery).where(Delivery.job_id == job.id))}
        assert states == {DeliveryState.CANCELLED}
        assert ses.get(Job, new_id).instance_count == 6


def test_running_job_superseded_finishes_without_sending(node):
    db, receiver, _ = node
    s = settings()
    receive(receiver)
    complete(db, s)
    job = claim(db, "h:1:w0", 10, later())
    receive(receiver, n=1, first=20)
    complete(db, s)
    assert finish_done(db, job.id, "h:1:w0", outcome(job.id), s, time.time())
    with db.session() as ses:
        assert ses.get(Job, job.id).state == JobState.SUPERSEDED
        assert not ses.scalars(select(Delivery).where(Delivery.job_id == job.id)).all()


def test_expired_lease_is_requeued_then_fails_after_max_attempts(node):
    db, receiver, _ = node
    s = settings()
    receive(receiver)
    complete(db, s)
    t = later()
    job = claim(db, "otherhost:1:w0", 10, t)
    assert requeue_lost(db, s, t + 5) == 0
    assert renew(db, job.id, "otherhost:1:w0", 10, t + 5)
    assert requeue_lost(db, s, t + 16) == 1
    with db.session() as ses:
        j = ses.get(Job, job.id)
        assert j.state == JobState.QUEUED and "worker lost" in j.last_error and j.not_before > t + 16
    assert not renew(db, job.id, "otherhost:1:w0", 10, t + 17)  # the lease is gone
    job = claim(db, "otherhost:1:w0", 10, t + 100)
    assert job.attempts == 2
    requeue_lost(db, s, t + 200)
    with db.session() as ses:
        j = ses.get(Job, job.id)
        assert j.state == JobState.FAILED and "gave up after 2" in j.reason


def test_job_of_a_dead_local_process_is_requeued_at_once(node):
    import socket

    db, receiver, _ = node
    s = settings()
    receive(receiver)
    complete(db, s)
    job = claim(db, f"{socket.gethostname()}:999999999:w0", 600, later())
    assert requeue_lost(db, s, time.time()) == 1
    with db.session() as ses:
        assert ses.get(Job, job.id).state == JobState.QUEUED


def test_job_of_a_killed_but_unreaped_worker_is_requeued_at_once(node):
    """A SIGKILLed worker whose new parent never reaps it lingers as a zombie: it is dead."""
    import socket
    import subprocess

    db, receiver, _ = node
    s = settings()
    receive(receiver)
    complete(db, s)
    zombie = subprocess.Popen(["true"])
    deadline = time.time() + 10
    while Path(f"/proc/{zombie.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
        assert time.time() < deadline
        time.sleep(0.01)
    try:
        job = claim(db, f"{socket.gethostname()}:{zombie.pid}:w0", 600, later())
        assert requeue_lost(db, s, time.time()) == 1
        with db.session() as ses:
            assert ses.get(Job, job.id).state == JobState.QUEUED
    finally:
        zombie.wait()


def test_job_of_a_live_local_process_is_left_running(node):
    import os
    import socket

    db, receiver, _ = node
    s = settings()
    receive(receiver)
    complete(db, s)
    claim(db, f"{socket.gethostname()}:{os.getppid()}:w0", 600, later())
    assert requeue_lost(db, s, time.time()) == 0


def test_failed_job_retried_on_request(node):
    db, receiver, _ = node
    s = settings()
    receive(receiver)
    complete(db, s)
    job = claim(db, "h:1:w0", 10, later())
    with pytest.raises(JobConflict, match="is running"):
        retry(db, job.id, s, time.time())
    finish_error(db, job.id, "h:1:w0", "MissingSlicesError: gap", s, time.time(), JobState.FAILED)
    retry(db, job.id, s, time.time())
    with db.session() as ses:
        j = ses.get(Job, job.id)
        assert j.state == JobState.QUEUED and j.attempts == 0


def test_only_failed_instances_are_sent_again_with_backoff(node):
    db = node[0]
    s = settings()
    job_id, outbox = done_job(node, s)
    fake = FakeSender(failing={f"9.9.{job_id}.1"})
    t = time.time()
    assert deliver_due(db, s, outbox, t, lambda d, st, r: fake) == 6  # 3 files x 2 destinations
    assert sorted(fake.sent) == sorted([f"9.9.{job_id}.{i}" for i in range(3)] * 2)
    fake.sent.clear()
    assert deliver_due(db, s, outbox, t + 5, lambda d, st, r: fake) == 0  # backing off
    fake.failing.clear()
    assert deliver_due(db, s, outbox, t + 11, lambda d, st, r: fake) == 2
    assert fake.sent == [f"9.9.{job_id}.1"] * 2
    with db.session() as ses:
        assert {d.state for d in ses.scalars(select(Delivery))} == {DeliveryState.DELIVERED}


def test_backoff_doubles_up_to_the_maximum():
    assert [backoff(n, 30, 600) for n in (1, 2, 3, 5, 9)] == [30, 60, 120, 480, 600]


def test_undelivered_results_expire_into_failed_then_retry(node):
    db = node[0]
    s = settings()
    job_id, outbox = done_job(node, s)
    down = FakeSender(failing={f"9.9.{job_id}.{i}" for i in range(3)})
    t = time.time()
    deliver_due(db, s, outbox, t, lambda d, st, r: down)
    deliver_due(db, s, outbox, t + 3601, lambda d, st, r: down)
    with db.session() as ses:
        rows = ses.scalars(select(Delivery)).all()
        assert {d.state for d in rows} == {DeliveryState.FAILED}
        assert all("expired after 1 attempt(s); last error: refused" in d.last_error for d in rows)
    retry(db, job_id, s, time.time())
    up = FakeSender()
    deliver_due(db, s, outbox, time.time(), lambda d, st, r: up)
    assert len(up.sent) == 6


def test_reply_to_a_sender_without_address_fails_at_once_with_the_reason(node):
    db = node[0]
    s = settings(destinations=[{"name": "back", "kind": "reply"}])
    job_id, outbox = done_job(node, s)
    deliver_due(db, s, outbox, time.time())
    with db.session() as ses:
        rows = ses.scalars(select(Delivery).where(Delivery.job_id == job_id)).all()
    assert {d.state for d in rows} == {DeliveryState.FAILED}
    assert "the sender CT1 has no host and port in allowed_callers" in rows[0].last_error


def test_a_query_only_destination_gets_no_results(node):
    db, receiver, _ = node
    query_only = {"name": "archive", "kind": "dimse", "ae_title": "VNA", "host": "127.0.0.1", "port": 4243}
    s = settings(
        destinations=[
            {"name": "pacs", "kind": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242},
            {**query_only, "send_results": False, "query": {}},
        ]
    )
    assert [d.name for d in s.result_destinations()] == ["pacs"] and s.query_peer().name == "archive"
    receive(receiver)
    complete(db, s)
    job = claim(db, "h:1:w0", 10, later())
    assert finish_done(db, job.id, "h:1:w0", outcome(job.id), s, time.time())
    with db.session() as ses:
        sent_to = {d.destination for d in ses.scalars(select(Delivery).where(Delivery.job_id == job.id))}
    assert sent_to == {"pacs"}
