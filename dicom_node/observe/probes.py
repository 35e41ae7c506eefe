"""The monitoring routes: `/healthz`, `/readyz`, `/metrics`, in one router of their own.

They are part of the main HTTP app and, with `node.monitoring_port`, also served on a port
of their own (`monitoring_app`), for networks where the API port is protected or not
reachable from the monitoring system. An authentication layer on the API exempts this
router.

- `/healthz`: the process answers (liveness).
- `/readyz`: 200 when a worker has the model loaded, the index takes a write, the spool
  takes a file and its disk has more than `spool.min_free_mb` free; else 503 naming the
  failing checks (readiness: stop sending studies here).
- `/metrics`: the Prometheus text exposition (`dicom_node.observe.metrics`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, FastAPI, Response
from fastapi.responses import JSONResponse

from dicom_node.index.db import Database, Heartbeat, now
from dicom_node.observe import metrics


@dataclass(frozen=True)
class Probes:
    """What readiness looks at."""

    db: Database
    spool_tmp: Path  # the spool's temporary folder (same file system as the spool)
    min_free_bytes: int
    model_loaded: Callable[[], bool]  # or, with Celery workers elsewhere: the broker answers
    ready_check: tuple[str, str]  # name, why not: the queue backend's READY_CHECK


def index_writable(db: Database) -> tuple[bool, str]:
    try:
        with db.session() as s:
            s.merge(Heartbeat(id=1, at=now()))
        return True, "ok"
    except Exception as e:
        return False, f"the index does not take writes: {type(e).__name__}"


def spool_writable(tmp: Path) -> tuple[bool, str]:
    probe = tmp / f".readyz-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"ok")
        probe.unlink()
        return True, "ok"
    except OSError as e:
        return False, f"cannot write to {tmp}: {e.strerror}"


def disk_free(tmp: Path, min_free_bytes: int) -> tuple[bool, str]:
    try:
        free = shutil.disk_usage(tmp).free
    except OSError as e:
        return False, f"cannot read the free space of {tmp}: {e.strerror}"
    mb = free // 2**20
    if free < min_free_bytes:
        return False, f"{mb} MB free, below spool.min_free_mb ({min_free_bytes // 2**20} MB)"
    return True, f"{mb} MB free"


def readiness(p: Probes) -> dict[str, tuple[bool, str]]:
    loaded = p.model_loaded()
    name, why_not = p.ready_check
    return {
        name: (loaded, "ok" if loaded else why_not),
        "index_writable": index_writable(p.db),
        "spool_writable": spool_writable(p.spool_tmp),
        "disk_space": disk_free(p.spool_tmp, p.min_free_bytes),
    }


def monitoring_router(probes: Probes) -> APIRouter:
    router = APIRouter(tags=["monitoring"])

    @router.get("/healthz")
    def healthz() -> dict:
        return {"status": "alive"}

    @router.get("/readyz")
    def readyz() -> JSONResponse:
        checks = readiness(probes)
        failing = [name for name, (ok, _) in checks.items() if not ok]
        body = {
            "status": "ready" if not failing else "not ready",
            "failing": failing,
            "checks": {name: {"ok": ok, "detail": detail} for name, (ok, detail) in checks.items()},
        }
        return JSONResponse(body, status_code=503 if failing else 200)

    @router.get("/metrics")
    def prometheus_metrics() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    return router


def monitoring_app(probes: Probes) -> FastAPI:
    """The monitoring routes alone, for `node.monitoring_port`."""
    app = FastAPI(title="nodal monitoring", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(monitoring_router(probes))
    return app
