"""The outbox: result files on disk, one delivery row per destination and instance.

`deliver_due` sends every due delivery, grouped by job and destination so that one
association (or one STOW-RS request) carries a job's results. Each instance's outcome is
recorded on its own row: delivered, or attempted again after an exponential backoff
(`retry_initial_seconds` doubling up to `retry_max_seconds`), so only the instances that
failed are sent again. A delivery still undelivered at `expires_at` becomes failed and
shows in the API; `POST /api/jobs/{id}/retry` queues it again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select

from dicom_node.config import ConfigError, Settings
from dicom_node.delivery.senders import NoRoute, Outgoing, Sender, make_sender
from dicom_node.index.db import Database, Delivery, DeliveryState, Job
from dicom_node.observe import audit, metrics
from dicom_node.observe.job_watcher import series_first_received

log = logging.getLogger("nodal.outbox")


def backoff(attempts: int, initial: float, maximum: float) -> float:
    """Seconds to wait after the `attempts`-th failed attempt."""
    return min(maximum, initial * 2 ** max(0, attempts - 1))


@dataclass(frozen=True)
class Batch:
    job_id: int
    destination: str
    reply_ae: str
    deliveries: tuple[tuple[int, Outgoing], ...]  # (delivery id, what to send)


def expire(db: Database, t: float) -> int:
    """Deliveries past their expiry become failed."""
    with db.session() as s:
        rows = s.scalars(
            select(Delivery).where(Delivery.state == DeliveryState.PENDING, Delivery.expires_at <= t)
        ).all()
        for d in rows:
            d.state = DeliveryState.FAILED
            d.last_error = f"expired after {d.attempts} attempt(s); last error: {d.last_error or 'none'}"
            metrics.RESULTS_FAILED.labels(d.destination).inc()
            log.error(
                "job %d: delivery to %s expired after %d attempt(s)",
                d.job_id,
                d.destination,
                d.attempts,
                extra={"event": "send", "job_id": d.job_id, "destination": d.destination},
            )
    return len(rows)


def due_batches(db: Database, outbox: Path, t: float, limit: int = 500) -> list[Batch]:
    with db.session() as s:
        rows = s.execute(
            select(Delivery, Job.reply_ae)
            .join(Job, Job.id == Delivery.job_id)
            .where(Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= t)
            .order_by(Delivery.job_id, Delivery.destination, Delivery.id)
            .limit(limit)
        ).all()
    groups: dict[tuple[int, str], list] = {}
    reply: dict[int, str] = {}
    for d, reply_ae in rows:
        groups.setdefault((d.job_id, d.destination), []).append(
            (d.id, Outgoing(d.sop_uid, d.sop_class_uid, outbox / d.file))
        )
        reply[d.job_id] = reply_ae
    return [Batch(job, dest, reply[job], tuple(items)) for (job, dest), items in groups.items()]


def record(
    db: Database,
    batch: Batch,
    errors: dict[str, str | None],
    settings: Settings,
    t: float,
    final: bool = False,
) -> None:
    """Store each instance's outcome; `final` errors fail at once instead of being retried."""
    dl = settings.delivery
    outcome = {DeliveryState.DELIVERED: 0, DeliveryState.FAILED: 0, DeliveryState.PENDING: 0}
    study_uid = None
    with db.session() as s:
        for delivery_id, item in batch.deliveries:
            d = s.get(Delivery, delivery_id)
            if d is None or d.state != DeliveryState.PENDING:
                continue  # cancelled meanwhile (superseded)
            d.attempts += 1
            error = errors.get(item.sop_uid, "no outcome reported")
            if error is None:
                d.state, d.delivered_at, d.last_error = DeliveryState.DELIVERED, t, None
            elif final:
                d.state, d.last_error = DeliveryState.FAILED, error
            else:
                d.last_error = error
                d.next_attempt_at = t + backoff(d.attempts, dl.retry_initial_seconds, dl.retry_max_seconds)
            outcome[d.state] += 1  # type: ignore[index]
        job = s.get(Job, batch.job_id)
        if job is not None:
            study_uid = job.study_uid
            if outcome[DeliveryState.DELIVERED]:
                _observe_if_all_delivered(s, job)
    sent = outcome[DeliveryState.DELIVERED]
    gave_up, retrying = outcome[DeliveryState.FAILED], outcome[DeliveryState.PENDING]
    dest = batch.destination
    metrics.RESULTS_SENT.labels(dest).inc(sent)
    metrics.RESULTS_FAILED.labels(dest).inc(gave_up)
    metrics.SEND_RETRIES.labels(dest).inc(retrying)
    extra = {"event": "send", "job_id": batch.job_id, "destination": dest, "count": sent}
    failed = [e for e in errors.values() if e is not None]
    if failed:
        log.warning(
            "job %d -> %s: %d delivered, %d %s (%s)",
            batch.job_id,
            dest,
            sent,
            len(failed),
            "failed for good" if final else "to retry",
            failed[0],
            extra=extra,
        )
    else:
        log.info("job %d -> %s: %d result instance(s) delivered", batch.job_id, dest, sent, extra=extra)
    if sent or gave_up or retrying:
        audit.record(
            db,
            audit.Event(
                "results_transferred",
                audit.FAILURE if failed else audit.SUCCESS,
                actor=dest,
                study_key=audit.study_key(study_uid) if study_uid else None,
                job_id=batch.job_id,
                count=sent,
                detail={"failed": len(failed), "final": final, **({"error": failed[0]} if failed else {})},
            ),
        )


def _observe_if_all_delivered(s, job: Job) -> None:
    """End-to-end time, once every result of the job reached every destination."""
    states = set(s.scalars(select(Delivery.state).where(Delivery.job_id == job.id).distinct()))
    if states != {DeliveryState.DELIVERED}:
        return
    last = s.scalar(select(func.max(Delivery.delivered_at)).where(Delivery.job_id == job.id))
    first = series_first_received(s, job.series_uid)
    if first is not None and last is not None:
        metrics.END_TO_END.observe(max(0.0, last - first))


def deliver_due(
    db: Database,
    settings: Settings,
    outbox: Path,
    t: float,
    sender_for: Callable[[object, Settings, str], Sender] = make_sender,
) -> int:
    """Attempt every due delivery once; returns the number of instances attempted."""
    expire(db, t)
    destinations = {d.name: d for d in settings.destinations}
    attempted = 0
    for batch in due_batches(db, outbox, t):
        items = [item for _, item in batch.deliveries]
        dest = destinations.get(batch.destination)
        if dest is None:
            why = f"destination {batch.destination!r} is no longer configured"
            record(
                db, batch, dict.fromkeys((i.sop_uid for i in items), why), settings, time.time(), final=True
            )
            continue
        try:
            sender = sender_for(dest, settings, batch.reply_ae)
        except (NoRoute, ConfigError) as e:  # NoRoute: retrying cannot help; a secret file may be fixed
            record(
                db,
                batch,
                dict.fromkeys((i.sop_uid for i in items), str(e)),
                settings,
                time.time(),
                final=isinstance(e, NoRoute),
            )
            continue
        missing = {i.sop_uid: "result file missing from the outbox" for i in items if not i.path.is_file()}
        present = [i for i in items if i.sop_uid not in missing]
        started = time.perf_counter()
        errors = missing | (_send(sender, dest.name, present) if present else {})
        metrics.SEND_SECONDS.labels(dest.name).observe(time.perf_counter() - started)
        record(db, batch, errors, settings, time.time())
        attempted += len(items)
    return attempted


def _send(sender: Sender, name: str, items: list[Outgoing]) -> dict[str, str | None]:
    try:
        return sender.send(items)
    except Exception as e:  # a sender bug must not stop the loop; the instances are retried
        log.exception("sending to %s failed unexpectedly", name)
        return {i.sop_uid: f"{type(e).__name__}: {e}" for i in items}


class DeliveryLoop(threading.Thread):
    def __init__(self, db: Database, settings: Settings, outbox: Path):
        super().__init__(daemon=True, name="delivery")
        self.db, self.settings, self.outbox = db, settings, outbox
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.settings.delivery.check_interval_seconds):
            try:
                deliver_due(self.db, self.settings, self.outbox, time.time())
            except Exception:
                log.exception("delivery round failed; trying again")

    def stop(self, timeout: float = 30.0) -> None:
        self._halt.set()
        self.join(timeout)
