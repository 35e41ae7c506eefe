"""The node under test in one process: settings, instances received, studies completed, a
fake destination."""

from __future__ import annotations

import time

from dicom_node.completion.quiet import complete_due_studies
from dicom_node.config import Settings
from dicom_node.jobs.outcome import JobOutcome, ResultFile
from dicom_node.jobs.table import (
    claim,
    finish_done,
)
from dicom_node.receive.contract import Source
from tests.helpers.dicom import CT, part10


def settings(**over) -> Settings:
    base = {
        "completion": {"quiet_seconds": 10, "after_release_seconds": 2},
        "routing": {"rules": [{"name": "ct", "min_slices": 3}]},
        "jobs": {"lease_seconds": 10, "max_attempts": 2, "retry_delay_seconds": 5},
        "destinations": [
            {"name": "pacs", "kind": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242},
            {"name": "web", "kind": "dicomweb", "url": "http://127.0.0.1:8042/dicom-web"},
        ],
        "delivery": {"retry_initial_seconds": 10, "retry_max_seconds": 40, "expire_hours": 1},
    }
    return Settings.model_validate({**base, **over})


def receive(receiver, n=4, series="1.2.3.4", first=1, description="Thorax", **extra):
    for i in range(first, first + n):
        receiver.store_bytes(
            part10(sop=f"{series}.{i}", series=series, SeriesDescription=description, **extra),
            Source("dimse", "a1", "CT1"),
        )
    receiver.flush()


def later() -> float:
    return time.time() + 60  # past the quiet period


def complete(db, s, t=None):
    return complete_due_studies(db, s, set(), t or later())


def outcome(job_id=1) -> JobOutcome:
    files = [
        ResultFile(f"job-{job_id}/{n}.dcm", CT, f"9.9.{job_id}.{i}")
        for i, n in enumerate(["seg", "sr", "sc"])
    ]
    return JobOutcome(f"job-{job_id}", files, findings=2)


class FakeSender:
    """Fails the instances listed in `failing`; records what it was asked to send."""

    def __init__(self, failing=()):
        self.failing = set(failing)
        self.sent: list[str] = []

    def send(self, items):
        self.sent.extend(i.sop_uid for i in items)
        return {i.sop_uid: ("refused" if i.sop_uid in self.failing else None) for i in items}


def done_job(node, s):
    db, receiver, root = node
    receive(receiver)
    complete(db, s)
    job = claim(db, "h:1:w0", 10, later())
    out = outcome(job.id)
    for f in out.files:
        (root / "outbox" / f.file).parent.mkdir(parents=True, exist_ok=True)
        (root / "outbox" / f.file).write_bytes(b"x")
    finish_done(db, job.id, "h:1:w0", out, s, time.time())
    return job.id, root / "outbox"
