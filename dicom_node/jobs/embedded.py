"""Workers: processes that load the model once and run jobs from the job table.

`worker_main` is the body of one worker process: load the model (kept warm for every
job), then claim a job, renew its lease while `run_analysis` works, record the outcome,
repeat. Claim-and-run is `run_next`, the one job function of both queue backends (the
Celery task of `nodal worker`, dicom_node.jobs.celery_backend, calls it too). `WorkerPool` (in the
`nodal serve` process) starts the workers, restarts one that died, stops one whose job ran
past `jobs.time_limit_seconds`, and on shutdown lets running jobs finish for
`jobs.shutdown_grace_seconds` before it stops them and re-queues their jobs.

Workers ignore SIGINT/SIGTERM (the serve process coordinates shutdown) and die with their
parent (PR_SET_PDEATHSIG), so a killed node leaves no orphan holding a lease.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from dicom_node.config import Settings
from dicom_node.index.db import Database, Instance, JobState
from dicom_node.jobs.queue import JobQueue
from dicom_node.jobs.table import claim, finish_done, finish_error, owner_id, release, renew

if TYPE_CHECKING:
    from inference.model_store import LoadedModel

log = logging.getLogger("nodal.worker")

EXIT_MODEL_UNAVAILABLE = 3
POLL_SECONDS = 0.5


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Heartbeat(threading.Thread):
    """Renews the lease of the running job every third of the lease."""

    def __init__(self, db: Database, job_id: int, owner: str, lease_seconds: float):
        super().__init__(daemon=True, name=f"lease-{job_id}")
        self.db, self.job_id, self.owner, self.lease = db, job_id, owner, lease_seconds
        self._halt = threading.Event()
        self.lost = False

    def run(self) -> None:
        while not self._halt.wait(self.lease / 3):
            try:
                if not renew(self.db, self.job_id, self.owner, self.lease, time.time()):
                    self.lost = True
                    log.warning("job %d: lease lost (taken over or superseded elsewhere)", self.job_id)
                    return
            except Exception as e:  # the DB busy for longer than one renewal: try again
                log.warning("job %d: could not renew the lease: %s", self.job_id, e)

    def stop(self) -> None:
        self._halt.set()


def worker_main(settings: Settings, index: int, stop, slot, parent_pid: int) -> None:
    """Entry point of a worker process (spawned)."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from dicom_node.observe.logs import configure_logging

    configure_logging(settings)
    db = Database(settings.index_url(), upgrade=False)  # `nodal serve` upgraded it
    model = load_model_or_exit(settings, f"worker {index}")
    _publish_model(slot, model)
    slot.ready.value = 1
    owner = owner_id(f"w{index}")

    def on_claim(job_id: int) -> None:
        with slot.job_id.get_lock():
            slot.job_id.value, slot.started.value = job_id, time.time()

    while not stop.is_set() and os.getppid() == parent_pid:
        try:
            if run_next(db, settings, owner, model, on_claim=on_claim) is None:
                stop.wait(POLL_SECONDS)
        finally:
            with slot.job_id.get_lock():
                slot.job_id.value = 0
            _publish_gpu(slot, model)
    db.close()


def load_model_or_exit(settings: Settings, who: str) -> LoadedModel:
    """Load the model once per worker process (kept warm for every job)."""
    try:
        from dicom_node.jobs.analysis import load_model

        t = time.perf_counter()
        model = load_model(settings)
        log.info("%s: model %s %s loaded in %.1f s", who, model.name, model.version, time.perf_counter() - t)
        return model
    except Exception as e:
        log.error("%s: cannot load the model: %s: %s", who, type(e).__name__, e)
        raise SystemExit(EXIT_MODEL_UNAVAILABLE) from None


def run_next(
    db: Database,
    settings: Settings,
    owner: str,
    model: LoadedModel,
    job_id: int | None = None,
    on_claim: Callable[[int], None] | None = None,
) -> int | None:
    """The job function of both queue backends: claim a job (the oldest due one, or `job_id`)
    under a lease and run it; the id of the job run, or None when there was nothing to claim."""
    job = claim(db, owner, settings.jobs.lease_seconds, time.time(), job_id)
    if job is None:
        return None
    if on_claim is not None:
        on_claim(job.id)
    outbox = settings.node.data_dir / "outbox"
    outbox.mkdir(parents=True, exist_ok=True)
    run_one(db, settings, job.id, job.series_uid, owner, settings.node.data_dir / "spool", outbox, model)
    return job.id


def _publish_model(slot: _Slot, model: LoadedModel) -> None:
    """Name, version and device of the loaded model, for `nodal_model_info` in the serve process."""
    info = json.dumps({"name": model.name, "version": model.version, "device": str(model.device)})
    slot.info.value = info.encode()[: len(slot.info) - 1]
    _publish_gpu(slot, model)


def _publish_gpu(slot: _Slot, model: LoadedModel) -> None:
    """GPU memory this process holds (CUDA only): what torch's caching allocator reserved,
    which keeps what the largest job needed. Published after loading, after each job and
    while idle."""
    if model.device.type != "cuda":
        return
    import torch

    slot.gpu_bytes.value = int(torch.cuda.memory_reserved(model.device))


def run_one(
    db: Database,
    settings: Settings,
    job_id: int,
    series_uid: str,
    owner: str,
    spool_root: Path,
    outbox: Path,
    model: LoadedModel,
) -> None:
    from functools import partial

    from dicom_node.jobs.analysis import JobInput, NotAnalysable, run_analysis
    from dicom_node.jobs.followup import prior_comparison, wanted

    heartbeat = _Heartbeat(db, job_id, owner, settings.jobs.lease_seconds)
    heartbeat.start()
    t0 = time.perf_counter()
    try:
        with db.session() as s:
            paths = [
                spool_root / p
                for p in s.scalars(select(Instance.path).where(Instance.series_uid == series_uid))
            ]
        log.info(
            "job %d: analysing a series of %d instance(s)",
            job_id,
            len(paths),
            extra={"event": "job", "job_id": job_id, "state": "running"},
        )
        hook = partial(prior_comparison, settings, db, job_id, model, paths) if wanted(settings) else None
        out = run_analysis(JobInput(job_id, paths), outbox, settings, model, follow_up=hook)
        finish_done(db, job_id, owner, out, settings, time.time())
        log.info(
            "job %d: done in %.1f s, %d finding(s), %d result file(s)",
            job_id,
            time.perf_counter() - t0,
            out.findings,
            len(out.files),
            extra={"event": "job", "job_id": job_id, "state": "done"},
        )
    except NotAnalysable as e:
        state = JobState.SKIPPED if e.skipped else JobState.FAILED
        finish_error(db, job_id, owner, str(e), settings, time.time(), state)
    except Exception as e:
        log.exception("job %d: attempt failed", job_id)
        finish_error(db, job_id, owner, f"{type(e).__name__}: {e}", settings, time.time(), None)
    finally:
        heartbeat.stop()


@dataclass
class _Slot:
    """Shared between the pool and one worker process."""

    job_id: Any  # mp.Value("q"): the running job, 0 when idle
    started: Any  # mp.Value("d"): when it started
    ready: Any  # mp.Value("b"): model loaded
    info: Any  # mp.Array("c"): JSON {name, version, device} of the loaded model
    gpu_bytes: Any  # mp.Value("q"): GPU memory held (CUDA only)
    process: mp.process.BaseProcess | None = None
    respawn_at: float = 0.0
    spawned_at: float = 0.0


class WorkerPool(JobQueue):
    """Embedded workers: spawned processes of this node, each with the model loaded."""

    READY_CHECK = ("model_loaded", "no worker has the model loaded (yet)")  # /readyz: name, why not

    def __init__(self, settings: Settings, db: Database):
        self.settings = settings
        self.db = db
        self._ctx = mp.get_context("spawn")
        self._stop = self._ctx.Event()
        self._slots = [
            _Slot(
                self._ctx.Value("q", 0),
                self._ctx.Value("d", 0.0),
                self._ctx.Value("b", 0),
                self._ctx.Array("c", 256),
                self._ctx.Value("q", 0),
            )
            for _ in range(settings.jobs.workers)
        ]
        self._stopping = False

    def start(self) -> None:
        for i in range(len(self._slots)):
            self._spawn(i)

    def _spawn(self, i: int) -> None:
        slot = self._slots[i]
        slot.ready.value = 0
        slot.job_id.value = 0
        slot.info.value = b""
        slot.gpu_bytes.value = 0
        slot.process = self._ctx.Process(
            target=worker_main,
            args=(
                self.settings,
                i,
                self._stop,
                _SlotView(slot.job_id, slot.started, slot.ready, slot.info, slot.gpu_bytes),
                os.getpid(),
            ),
            name=f"nodal-worker-{i}",
            daemon=False,
        )
        slot.process.start()
        slot.spawned_at = time.time()

    def ready(self) -> bool:
        return any(s.ready.value for s in self._slots)

    def ready_count(self) -> int:
        return sum(1 for s in self._slots if s.ready.value and s.process is not None and s.process.is_alive())

    def models(self) -> list[dict[str, str]]:
        """{name, version, device} of each worker with its model loaded."""
        out = []
        for s in self._slots:
            if s.ready.value and s.info.value:
                try:
                    out.append(json.loads(s.info.value.decode()))
                except ValueError:
                    continue
        return out

    def gpu_bytes(self) -> dict[str, int]:
        """GPU memory per worker (only workers on a CUDA device report any)."""
        return {str(i): s.gpu_bytes.value for i, s in enumerate(self._slots) if s.gpu_bytes.value}

    def supervise(self) -> None:
        """Restart dead workers; stop one whose job ran past the time limit (call every second)."""
        if self._stopping:
            return
        t = time.time()
        limit = self.settings.jobs.time_limit_seconds
        for i, slot in enumerate(self._slots):
            p = slot.process
            if p is None:
                continue
            if p.is_alive():
                job_id = slot.job_id.value
                if job_id and t - slot.started.value > limit:
                    log.error("job %d: time limit of %.0f s exceeded; stopping worker %d", job_id, limit, i)
                    p.kill()
                    p.join(10)
                    self._fail_running(slot, p.pid, i, f"time limit of {limit:.0f} s exceeded")
                    self._spawn(i)
                continue
            if slot.respawn_at == 0.0:
                code = p.exitcode
                self._fail_running(slot, p.pid, i, f"worker process ended unexpectedly (exit code {code})")
                quick = t - slot.spawned_at < 60
                delay = 60.0 if code == EXIT_MODEL_UNAVAILABLE or quick else 1.0
                log.error("worker %d ended (exit code %s); restarting in %.0f s", i, code, delay)
                slot.respawn_at = t + delay
            elif t >= slot.respawn_at:
                slot.respawn_at = 0.0
                self._spawn(i)

    def _fail_running(self, slot: _Slot, pid: int | None, i: int, why: str) -> None:
        job_id = slot.job_id.value
        slot.job_id.value = 0
        if job_id:
            finish_error(self.db, job_id, owner_id(f"w{i}", pid), why, self.settings, time.time(), None)

    def stop(self, grace_seconds: float) -> None:
        """Let running jobs finish within `grace_seconds`; stop the rest and re-queue their jobs."""
        self._stopping = True
        self._stop.set()
        deadline = time.monotonic() + grace_seconds
        for i, slot in enumerate(self._slots):
            p = slot.process
            if p is None:
                continue
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                job_id = slot.job_id.value
                p.kill()
                p.join(10)
                if job_id:
                    release(self.db, job_id, owner_id(f"w{i}", p.pid), "re-queued at shutdown")
                    log.info("job %d re-queued at shutdown", job_id)


@dataclass(frozen=True)
class _SlotView:
    """The picklable part of a slot handed to the worker process."""

    job_id: object
    started: object
    ready: object
    info: object
    gpu_bytes: object
