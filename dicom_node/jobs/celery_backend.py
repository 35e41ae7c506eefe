"""The Celery queue backend: `nodal serve` announces jobs, `nodal worker` processes run them.

The job table stays the source of truth. A Celery message only says "job N is ready"; the
worker claims job N through `table.claim` (a message for a job already claimed, finished or
not yet due is dropped) and runs it with `embedded.run_next`, the same job function as the
embedded workers. Messages are acknowledged late and prefetched one at a time, and each
worker process runs one job at a time (solo pool).

A worker that dies mid-job stops renewing its lease; `nodal serve` re-queues the job
(`table.requeue_lost`, one attempt counted) and announces it again once it is due, so
another worker takes it up. The dead worker's unacknowledged message, redelivered later
by the broker, finds the job claimed or done and is dropped.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from celery import Celery
from celery.signals import worker_ready
from sqlalchemy import or_, select

from dicom_node.config import Settings
from dicom_node.index.db import Database, Job, JobState
from dicom_node.jobs.queue import JobQueue

log = logging.getLogger("nodal.queue")

TASK = "nodal.run_job"
EXIT_TIME_LIMIT = 4
BROKER_CHECK_SECONDS = 5.0


def make_app(settings: Settings) -> Celery:
    q = settings.queue
    app = Celery("nodal", broker=q.broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        task_ignore_result=True,
        task_default_queue=q.queue_name,
        task_routes={TASK: {"queue": q.queue_name}},
        worker_hijack_root_logger=False,
        # nodal's own logging writes each line to the process's stderr (observe.logs); were
        # stdout/stderr redirected into Celery's logger, those lines would loop back into it
        worker_redirect_stdouts=False,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        # an unacknowledged message (its worker died) comes back this late; the job table
        # has long re-queued and re-announced the job by then
        broker_transport_options={"visibility_timeout": 4 * settings.jobs.time_limit_seconds},
    )
    return app


class Dispatcher(JobQueue):
    """In `nodal serve`: announces due queued jobs (`supervise` every main-loop round).

    It implements `queue.JobQueue`, as `embedded.WorkerPool` does, so `serve.Node` holds one or the other. The
    workers run elsewhere: their model and GPU memory are not seen from here."""

    READY_CHECK = ("queue_broker", "the Celery broker does not answer")  # /readyz: name, why not

    def __init__(self, settings: Settings, db: Database):
        self.settings, self.db = settings, db
        self.app = make_app(settings)
        self._broker_ok = False
        self._broker_checked = 0.0
        self._lock = threading.Lock()

    def start(self) -> None:
        log.info(
            "queue: celery on %s (queue %r); jobs run in `nodal worker` processes",
            _safe_url(self.settings.queue.broker_url),
            self.settings.queue.queue_name,
        )

    def ready(self) -> bool:
        """The broker answers (checked at most every few seconds)."""
        with self._lock:
            if time.monotonic() - self._broker_checked > BROKER_CHECK_SECONDS:
                self._broker_checked = time.monotonic()
                try:
                    with self.app.connection_for_write() as conn:
                        conn.ensure_connection(max_retries=1, timeout=2)
                    self._broker_ok = True
                except Exception as e:
                    if self._broker_ok:
                        log.error(
                            "queue: broker %s unreachable: %s", _safe_url(self.settings.queue.broker_url), e
                        )
                    self._broker_ok = False
            return self._broker_ok

    def ready_count(self) -> int:
        return 0

    def models(self) -> list[dict[str, str]]:
        return []

    def gpu_bytes(self) -> dict[str, int]:
        return {}

    def supervise(self) -> None:
        try:
            self.publish_due(time.time())
        except Exception as e:  # broker down: jobs stay queued in the index and go out later
            log.warning("queue: could not announce jobs: %s: %s", type(e).__name__, e)

    def publish_due(self, t: float) -> list[int]:
        """Announce queued, due jobs not announced in the last `queue.republish_seconds`."""
        stale = t - self.settings.queue.republish_seconds
        with self.db.session() as s:
            jobs = s.scalars(
                select(Job)
                .where(
                    Job.state == JobState.QUEUED,
                    Job.not_before <= t,
                    or_(Job.published_at.is_(None), Job.published_at < stale),
                )
                .order_by(Job.not_before, Job.id)
                .with_for_update(skip_locked=True)
            ).all()
            for job in jobs:
                self.app.send_task(TASK, args=[job.id], queue=self.settings.queue.queue_name)
                if job.published_at is not None:
                    log.info("job %d: still unclaimed, announced again", job.id)
                job.published_at = t
            return [j.id for j in jobs]

    def stop(self, grace_seconds: float) -> None:
        pass  # running jobs belong to the workers; they finish or are re-queued by lease


def _safe_url(url: str) -> str:
    """The broker URL without its password, for logs."""
    from kombu.utils.url import maybe_sanitize_url

    return maybe_sanitize_url(url)


def run_worker(settings: Settings, gpu: int | None = None, name: str | None = None) -> int:
    """`nodal worker`: one Celery worker process, one job at a time, bound to one GPU."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)  # before torch is imported
    from dicom_node.index.schema import SchemaOutdated
    from dicom_node.jobs.embedded import load_model_or_exit, run_next
    from dicom_node.jobs.table import owner_id

    name = name or (f"gpu{gpu}" if gpu is not None else "cpu")
    try:
        db = Database(settings.index_url(), upgrade=False)
    except SchemaOutdated as e:
        log.error("%s", e)
        return 2
    model = load_model_or_exit(settings, f"worker {name}")
    owner = owner_id(f"celery-{name}")
    app = make_app(settings)
    limit = settings.jobs.time_limit_seconds

    @app.task(name=TASK, acks_late=True)
    def run_job(job_id: int) -> None:
        timer = threading.Timer(limit, _time_limit_exceeded, (job_id, limit))
        timer.daemon = True
        timer.start()
        try:
            if run_next(db, settings, owner, model, job_id=job_id) is None:
                log.info("job %d: already claimed, finished or not due; message dropped", job_id)
        finally:
            timer.cancel()

    worker_ready.connect(lambda **_: log.info("worker %s: ready for jobs", name), weak=False)
    log.info(
        "worker %s (%s): queue %r on %s, GPU %s",
        name,
        owner,
        settings.queue.queue_name,
        _safe_url(settings.queue.broker_url),
        gpu if gpu is not None else "none (CUDA_VISIBLE_DEVICES unchanged)",
    )
    worker = app.Worker(
        pool="solo",
        concurrency=1,
        prefetch_multiplier=1,
        queues=[settings.queue.queue_name],
        hostname=f"nodal-{name}@{socket.gethostname()}",
        without_gossip=True,
        without_mingle=True,
        loglevel=settings.logging.level,
        quiet=True,
    )
    worker.start()
    db.close()
    return worker.exitcode or 0


def _time_limit_exceeded(job_id: int, limit: float) -> None:
    """A solo-pool job cannot be interrupted: end the process; the job's lease runs out and
    `nodal serve` re-queues it (the process supervisor restarts the worker)."""
    log.error("job %d: time limit of %.0f s exceeded; worker exits", job_id, limit)
    logging.shutdown()
    os._exit(EXIT_TIME_LIMIT)
