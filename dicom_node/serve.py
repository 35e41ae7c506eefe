"""`nodal serve`: every part of the node in one process (workers in child processes).

Start-up: upgrade the index schema (dicom_node.index.schema), reconcile the spool with the index
(files an earlier run wrote but never indexed; temporary files it never acknowledged),
re-queue jobs whose worker is gone, start the workers (or, with `queue.backend: celery`,
the announcer of jobs to `nodal worker` processes), the DIMSE receiver, the HTTP server
(API + STOW-RS), the delivery and retention loops. The main thread then completes quiet
studies and supervises workers.

SIGTERM or SIGINT: stop accepting (DIMSE listener closed, open associations get a few
seconds, HTTP finishes its requests), let running jobs finish for
`jobs.shutdown_grace_seconds` and re-queue the rest, stop delivery after its current
batch, exit 0.
"""

from __future__ import annotations

import logging
import resource
import signal
import ssl
import threading
import time

import uvicorn
from alembic.util import CommandError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.api.app import create_app, probes
from dicom_node.completion.quiet import complete_due_studies
from dicom_node.config import DimseDestination, ReplyDestination, Settings
from dicom_node.delivery.outbox import DeliveryLoop
from dicom_node.delivery.senders import make_sender
from dicom_node.index.db import Database, forget_patients
from dicom_node.jobs.embedded import WorkerPool
from dicom_node.jobs.queue import JobQueue
from dicom_node.jobs.table import requeue_lost
from dicom_node.observe import audit, metrics
from dicom_node.observe.job_watcher import JobWatcher, read_state
from dicom_node.observe.probes import monitoring_app
from dicom_node.receive.http_limits import header_timeout_protocol
from dicom_node.receive.receiver import Receiver
from dicom_node.receive.reconcile import reconcile
from dicom_node.receive.scp import DimseServer
from dicom_node.retention import RetentionLoop
from dicom_node.spool.store import Spool
from dicom_node.tls import server_context

log = logging.getLogger("nodal.serve")

ASSOCIATION_GRACE_SECONDS = 10.0
LEASE_CHECK_SECONDS = 5.0


class StartupError(RuntimeError):
    """A part of the node could not start (a port in use, an unwritable folder)."""


class Node:
    def __init__(self, settings: Settings):
        self.settings = settings
        data = settings.node.data_dir
        data.mkdir(parents=True, exist_ok=True)
        self.db = Database(settings.index_url())
        self.spool = Spool(data / "spool", settings.spool.durability, settings.spool.log_segment_mb << 20)
        self.outbox = data / "outbox"
        self.outbox.mkdir(exist_ok=True)
        self.receiver = Receiver(
            self.spool, self.db, settings.spool.min_free_mb * 2**20, settings.status_page.show_patient
        )
        self.scp = DimseServer(settings, self.receiver)
        self.workers = _queue(settings, self.db)
        check_destinations(settings)
        metrics.declare_destinations(dest.name for dest in settings.destinations)
        declare_query_peer(settings)  # issue 17
        self.delivery = DeliveryLoop(self.db, settings, self.outbox)
        self.retention = RetentionLoop(self.db, settings, self.spool.root, self.outbox)
        app = create_app(settings, self.db, self.receiver, self.workers.ready, self.workers.READY_CHECK)
        node = settings.node
        header_timeout = node.http_limits.header_timeout_seconds
        tls = https_options(settings)
        self.http = _http_server(app, node.bind_address, node.http_port, header_timeout, tls)
        self._http_thread = threading.Thread(target=self.http.run, name="http", daemon=True)
        self.monitoring: uvicorn.Server | None = None  # /metrics, /healthz, /readyz on their own port
        if settings.node.monitoring_port is not None:
            mon = monitoring_app(
                probes(settings, self.db, self.receiver, self.workers.ready, self.workers.READY_CHECK)
            )
            self.monitoring = _http_server(mon, node.bind_address, node.monitoring_port, header_timeout)  # type: ignore[arg-type]
            self._monitoring_thread = threading.Thread(
                target=self.monitoring.run, name="monitoring", daemon=True
            )
        self._last_lease_check = 0.0
        self.watcher = JobWatcher(self.db, bool(settings.result_destinations()), time.time())
        metrics.STATE.read = lambda: read_state(
            self.db,
            self.spool.root,
            self.workers.ready_count,
            self.workers.models,
            self.workers.gpu_bytes,
            self.spool.unwritten_bytes,
        )

    def start(self) -> None:
        show_patient = self.settings.status_page.show_patient
        if not show_patient and (erased := forget_patients(self.db)):
            log.warning(
                "status_page.show_patient is off: patient name and ID erased from %d indexed stud(y/ies)",
                erased,
            )
        reconcile(self.spool, self.db, show_patient)
        lost = requeue_lost(self.db, self.settings, time.time())
        if lost:
            log.warning("%d job(s) left running by an earlier run were taken up again", lost)
        self.workers.start()
        try:  # before HTTP: once /healthz answers, the DIMSE port listens too
            self.scp.start()
        except OSError as e:
            raise StartupError(
                f"the DIMSE receiver could not listen on port {self.settings.node.dimse_port}: {e.strerror}"
            ) from None
        _start_http(self.http, self._http_thread, self.settings.node.bind_address, "HTTP")
        if self.monitoring is not None:
            _start_http(
                self.monitoring, self._monitoring_thread, self.settings.node.bind_address, "monitoring"
            )
        self.delivery.start()
        self.retention.start()
        self._log_summary()
        digest = audit.config_hash(self.settings)
        audit.record(
            self.db,
            audit.Event("config_loaded", actor="nodal", detail={"sha256": digest}),
        )
        log.info("configuration sha256 %s", digest, extra={"event": "config_loaded"})

    def _log_summary(self) -> None:
        s = self.settings
        dests = ", ".join(f"{d.name} ({d.kind})" for d in s.destinations)
        log.info(
            "nodal serve: AE %s on DIMSE port %d%s, HTTP%s port %d (API, STOW-RS), data in %s, %s; "
            "destinations: %s",
            s.node.ae_title,
            s.node.dimse_port,
            " (TLS)" if s.node.dimse_tls.enabled else "",
            "S" if s.node.http_tls.enabled else "",
            s.node.http_port,
            s.node.data_dir,
            f"{s.jobs.workers} worker(s)" if s.queue.backend == "embedded" else "jobs to celery workers",
            dests or f"none (results stay in {self.outbox} and the API)",
        )
        if any(isinstance(d, ReplyDestination) for d in s.destinations) and not any(
            c.port for c in s.allowed_callers
        ):
            log.warning("a reply destination is configured but no allowed_callers entry has a port")

    def tick(self) -> None:
        """One round of the main loop: complete quiet studies, supervise workers, check leases."""
        self.receiver.flush_index(timeout=5.0)  # acknowledged instances are in the index first
        t = time.time()
        complete_due_studies(
            self.db,
            self.settings,
            self.receiver.transfers.open_studies(),
            t,
            files_written=lambda: self.receiver.flush(timeout=60.0),
        )
        self.workers.supervise()
        self.watcher.poll(t)
        if t - self._last_lease_check >= LEASE_CHECK_SECONDS:
            self._last_lease_check = t
            lost = requeue_lost(self.db, self.settings, t)
            if lost:
                log.warning("%d job(s) whose worker was lost were taken up again", lost)

    def stop(self) -> None:
        log.info("shutting down: no new associations or requests")
        self.scp.stop(ASSOCIATION_GRACE_SECONDS)
        self.http.should_exit = True
        self._http_thread.join(ASSOCIATION_GRACE_SECONDS)
        self.receiver.close()  # every acknowledged instance indexed
        self.retention.stop()
        grace = self.settings.jobs.shutdown_grace_seconds
        log.info("waiting up to %.0f s for running jobs", grace)
        self.workers.stop(grace)
        self.delivery.stop()
        self.watcher.poll(time.time())
        audit.record(self.db, audit.Event("application_stop", actor="nodal"))
        if self.monitoring is not None:  # probes and metrics answer until the end
            self.monitoring.should_exit = True
            self._monitoring_thread.join(ASSOCIATION_GRACE_SECONDS)
        metrics.STATE.read = None
        self.spool.close()
        self.db.close()
        log.info("stopped")


def _http_server(app, host: str, port: int, header_timeout: float, tls: dict | None = None) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        http=header_timeout_protocol(header_timeout),
        **(tls or {}),
    )
    return uvicorn.Server(config)


def _start_http(server: uvicorn.Server, thread: threading.Thread, host: str, what: str) -> None:
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise StartupError(
                f"the {what} server could not listen on {host}:{server.config.port} (port in use?)"
            )
        time.sleep(0.05)


def _queue(settings: Settings, db: Database) -> JobQueue:
    """In-process workers (embedded) or the announcer of jobs to `nodal worker` processes (celery)."""
    if settings.queue.backend == "celery":
        from dicom_node.jobs.celery_backend import Dispatcher

        return Dispatcher(settings, db)
    return WorkerPool(settings, db)


def check_destinations(settings: Settings) -> None:
    """Load each destination's TLS files and password once: a wrong path stops start-up
    (ConfigError) instead of failing every delivery later."""
    for dest in settings.destinations:
        if not isinstance(dest, ReplyDestination):
            make_sender(dest, settings, "")


def https_options(settings: Settings) -> dict:
    """uvicorn's TLS options for node.http_tls (checked by loading them once: clear errors)."""
    tls = settings.node.http_tls
    if server_context(tls, "node.http_tls") is None:
        return {}
    reqs = (
        ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL if tls.ca_file else ssl.CERT_NONE
    )
    return {
        "ssl_certfile": str(tls.cert_file),
        "ssl_keyfile": str(tls.key_file),
        "ssl_ca_certs": str(tls.ca_file) if tls.ca_file else None,
        "ssl_cert_reqs": reqs,
    }


def raise_descriptor_limit() -> tuple[int, int, int]:
    """Raise the soft limit on open files to the hard limit; (soft before, soft, hard).

    Every DIMSE connection, HTTP connection and spool file takes a descriptor, and the
    receivers share this process's limit (often 1024 soft): the hard limit is the most
    the system lets nodal hold before connections are refused."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, e)
            return soft, soft, hard
        return soft, target, hard
    return soft, soft, hard


def serve(settings: Settings) -> int:
    stop = threading.Event()
    before, soft, hard = raise_descriptor_limit()
    log.info(
        "open-file limit: soft %d%s, hard %d",
        soft,
        f" (raised from {before})" if soft != before else "",
        hard,
        extra={"event": "descriptor_limit"},
    )
    if soft < settings.node.min_open_files:
        log.warning(
            "only %d open files allowed (node.min_open_files %d): a flood of connections may exhaust "
            "them; raise the hard limit (systemd LimitNOFILE=, docker --ulimit nofile=)",
            soft,
            settings.node.min_open_files,
        )

    def on_signal(signum, _frame) -> None:
        log.info("received %s", signal.Signals(signum).name)
        if stop.is_set():
            raise SystemExit(1)  # a second signal: leave now
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        node = Node(settings)
    except (SQLAlchemyError, CommandError) as e:  # unreachable; or newer than this nodal
        url = make_url(settings.index_url()).render_as_string(hide_password=True)
        log.error("cannot open or upgrade the index %s: %s (check index.url and the database)", url, e)
        return 1
    try:
        node.start()
    except StartupError as e:
        log.error("%s", e)
        node.scp.stop(0)
        node.workers.stop(0)
        return 1
    interval = settings.completion.check_interval_seconds
    while not stop.wait(interval):
        try:
            node.tick()
        except Exception:
            log.exception("main loop round failed; going on")
    node.stop()
    return 0


def declare_query_peer(settings: Settings) -> None:
    """The query destination's metric series at 0 from the start, and a line in the log (issue 17)."""
    peer = settings.query_peer()
    if peer is None:
        if settings.followup.enabled:
            log.info("follow-up: no destination has a query role; studies are read without their prior")
        return
    operations: tuple[str, ...]
    if isinstance(peer, DimseDestination) and peer.query is not None:
        operations = ("find", peer.query.retrieve)
    else:
        operations = ("qido", "wado")
    metrics.declare_query_destination(peer.name, operations)
    log.info(
        "query destination %s (%s); follow-up %s",
        peer.name,
        "/".join(operations),
        "on" if settings.followup.enabled else "off",
    )
