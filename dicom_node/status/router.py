"""The status page: what nodal received, did and sent, for IT and the reading room.

- `GET /`: health, live figures, the study list (paged), recent refusals, the model card and
  the effective configuration (secrets masked); server-rendered (Jinja2, autoescaped), a
  little JavaScript polls `/status/data.json` every `status_page.refresh_seconds`
- `GET /status/data.json?offset=`: the same figures and study page as JSON
- `GET /status/studies/{uid}`: one study: series and routing, jobs, deliveries with errors,
  a retry button per job, a link to a viewer (`status_page.viewer_url`)
- `GET /status/jobs/{id}/images/sc-NNN.png`: a result image of the job as a thumbnail
- `POST /status/jobs/{id}/retry`: the retry button (CSRF token + same origin; audited)
- `POST /status/studies/{uid}/reprocess`: the reprocess button: the study's routed series
  analysed again from the spool, as new jobs (CSRF token + same origin; audited)
- `GET|POST /status/login`, `POST /status/logout`: the session cookie (`dicom_node.status.session`)
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import re
from pathlib import Path
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.concurrency import run_in_threadpool

from dicom_node.completion.quiet import reprocess_study
from dicom_node.config import Settings
from dicom_node.index.db import Database, Job, now
from dicom_node.jobs.table import JobConflict, reprocess_summary, retry
from dicom_node.observe import audit, metrics
from dicom_node.observe.probes import Probes, readiness
from dicom_node.status import views
from dicom_node.status.session import COOKIE, MAX_AGE_SECONDS, Sessions, same_origin

log = logging.getLogger("nodal.status")
STATIC = Path(__file__).parent / "static"
VERSION = "0.1.0"

ENV = Environment(
    loader=PackageLoader("dicom_node.status", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)


def model_card(settings: Settings) -> dict:
    """The model card of the configured model, read as JSON (no torch in the serve process)."""
    folder = settings.inference.model_dir
    if folder is None:
        spec = importlib.util.find_spec("inference")
        if spec is None or not spec.submodule_search_locations:
            return {}
        folder = Path(next(iter(spec.submodule_search_locations))) / "models" / "nodal-ln-demo"
    try:
        card = json.loads((Path(folder) / "model_card.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in card.items() if k not in ("weights",)}


def effective_config(settings: Settings) -> str:
    """The configuration as `nodal config` prints it: SecretStr values are masked by pydantic."""
    return json.dumps(json.loads(settings.model_dump_json()), indent=2)


def viewer_link(template: str | None, study_uid: str) -> str | None:
    if not template:
        return None
    return template.replace("{StudyInstanceUID}", quote(study_uid, safe=""))


def health(probes: Probes, settings: Settings) -> dict:
    checks = readiness(probes)
    state = metrics.STATE.read() if metrics.STATE.read is not None else None
    models = list(state.models) if state is not None else []
    return {
        "ready": all(ok for ok, _ in checks.values()),
        "checks": [{"name": n, "ok": ok, "detail": d} for n, (ok, d) in checks.items()],
        "models": models,
        "device": ", ".join(sorted({m["device"] for m in models})) or settings.inference.device,
        "version": VERSION,
    }


RESULT_IMAGE = re.compile(r"^sc-\d{3}\.dcm$")
THUMBNAIL_PX = 320


def result_images(outbox: Path, result_dir: str | None) -> list[str]:
    """The result images (secondary captures) a job left in the outbox, by file name."""
    if not result_dir:
        return []
    folder = outbox / result_dir
    try:
        return sorted(p.name for p in folder.iterdir() if RESULT_IMAGE.match(p.name))
    except OSError:
        return []


def thumbnail(path: Path, size: int = THUMBNAIL_PX) -> bytes:
    """A result image (8-bit RGB or MONOCHROME2 secondary capture) as a small PNG."""
    import numpy as np
    import pydicom
    from PIL import Image

    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    if pixels.dtype != np.uint8:
        lo, hi = float(pixels.min()), float(pixels.max())
        pixels = ((pixels - lo) * (255.0 / max(hi - lo, 1.0))).astype(np.uint8)
    image = Image.fromarray(pixels)
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def status_router(
    settings: Settings, db: Database, probes: Probes, sessions: Sessions, spool_root: Path
) -> APIRouter:
    router = APIRouter(tags=["status page"], include_in_schema=False)
    page = settings.status_page
    outbox = settings.node.data_dir / "outbox"
    card = model_card(settings)
    config_text = effective_config(settings)

    def data(offset: int) -> dict:
        t = now()
        listing = views.studies_page(db, page.page_size, offset, page.show_patient)
        for st in listing["studies"]:
            st["viewer_url"] = viewer_link(page.viewer_url, st["study_instance_uid"])
        return {
            "health": health(probes, settings),
            "live": views.live(db, t, page.live_window_minutes * 60),
            "studies": listing,
            "refusals": views.refusals(db),
        }

    def render(name: str, request: Request, status_code: int = 200, **values) -> HTMLResponse:
        cookie = request.cookies.get(COOKIE)
        html = ENV.get_template(name).render(
            csrf=sessions.csrf(cookie),
            auth=sessions.auth,
            refresh_seconds=page.refresh_seconds,
            **values,
        )
        return HTMLResponse(html, status_code=status_code, headers=_headers())

    @router.get("/", response_class=HTMLResponse)
    def index(request: Request, offset: int = Query(0, ge=0)) -> HTMLResponse:
        return render("index.html", request, d=data(offset), card=card, config=config_text)

    @router.get("/status/data.json")
    def status_data(offset: int = Query(0, ge=0)) -> JSONResponse:
        return JSONResponse(data(offset), headers=_headers())

    def study_page(request: Request, study_uid: str, status_code: int = 200, error: str | None = None):
        detail = views.study_detail(db, study_uid, page.show_patient)
        if detail is None:
            raise HTTPException(404, "no such study")
        detail["viewer_url"] = viewer_link(page.viewer_url, study_uid)
        for j in detail["jobs"]:
            j["images"] = [] if j["results_purged"] else result_images(outbox, j["result_dir"])
        message = request.query_params.get("message")
        return render("study.html", request, status_code, s=detail, message=message, error=error)

    @router.get("/status/studies/{study_uid}", response_class=HTMLResponse)
    def study(request: Request, study_uid: str) -> HTMLResponse:
        return study_page(request, study_uid)

    def checked(request: Request, csrf: str, action: dict) -> str:
        """The client's address once the form proved to come from this page; else 403 (audited)."""
        cookie = request.cookies.get(COOKIE)
        client = request.client.host if request.client else "-"
        host = request.headers.get("host", "")
        if not same_origin(dict(request.headers), host) or not sessions.csrf_ok(cookie, csrf):
            log.warning("%s from %s refused: cross-site or stale form", action["action"], client)
            _audit(db, client, audit.FAILURE, "cross-site request or stale form", **action)
            raise HTTPException(403, "cross-site request refused: reload the page and press the button again")
        return client

    @router.post("/status/jobs/{job_id}/retry")
    async def retry_button(request: Request, job_id: int) -> Response:
        csrf = (await form(request)).get("csrf", "")
        return await run_in_threadpool(do_retry, request, job_id, csrf)

    def do_retry(request: Request, job_id: int, csrf: str) -> Response:
        action: dict = {"action": "retry", "job_id": job_id}
        client = checked(request, csrf, action)
        try:
            study_uid = retry(db, job_id, settings, now()).study_uid
        except KeyError:
            raise HTTPException(404, f"no job {job_id}") from None
        except JobConflict as e:
            _audit(db, client, audit.FAILURE, str(e), **action)
            raise HTTPException(409, str(e)) from None
        _audit(db, client, audit.SUCCESS, "retry", **action)
        log.info("job %d retried from the status page by %s", job_id, client)
        target = f"/status/studies/{quote(study_uid, safe='')}?message=" + quote(f"job {job_id} retried")
        return RedirectResponse(target, status_code=303)

    @router.post("/status/studies/{study_uid}/reprocess")
    async def reprocess_button(request: Request, study_uid: str) -> Response:
        csrf = (await form(request)).get("csrf", "")
        return await run_in_threadpool(do_reprocess, request, study_uid, csrf)

    def do_reprocess(request: Request, study_uid: str, csrf: str) -> Response:
        action: dict = {"action": "reprocess", "study_uid": study_uid}
        client = checked(request, csrf, action)
        try:
            jobs = reprocess_study(db, study_uid, spool_root, settings.routing, now())
        except KeyError:
            raise HTTPException(404, "no such study") from None
        except JobConflict as e:
            _audit(db, client, audit.FAILURE, str(e), **action)
            return study_page(request, study_uid, 409, f"Not reprocessed: {e}")
        done = reprocess_summary(jobs)
        _audit(db, client, audit.SUCCESS, done, count=len(jobs), **action)
        log.info(
            "study %s reprocessed from the status page by %s: %s", audit.study_key(study_uid), client, done
        )
        target = f"/status/studies/{quote(study_uid, safe='')}?message=" + quote(f"reprocessing: {done}")
        return RedirectResponse(target, status_code=303)

    @router.get("/status/jobs/{job_id}/images/{name}")
    def job_image(job_id: int, name: str) -> Response:
        dcm = name.removesuffix(".png") + ".dcm"
        if not name.endswith(".png") or not RESULT_IMAGE.match(dcm):
            raise HTTPException(404, "no such image")
        with db.session() as s:
            job = s.get(Job, job_id)
            folder = None if job is None or job.results_purged_at is not None else job.result_dir
        if not folder or dcm not in result_images(outbox, folder):
            raise HTTPException(404, "no such image")
        try:
            png = thumbnail(outbox / folder / dcm)
        except Exception as e:  # a file that does not decode: no image, the page stays
            log.warning("result image %s of job %d unreadable: %s", dcm, job_id, type(e).__name__)
            raise HTTPException(404, "image unreadable") from None
        return Response(
            png, media_type="image/png", headers={**_headers(), "Cache-Control": "private, max-age=3600"}
        )

    @router.get("/status/login", response_class=HTMLResponse)
    def login_form(request: Request) -> Response:
        if not sessions.auth:
            return RedirectResponse("/", status_code=303)
        return render("login.html", request, error=None)

    @router.post("/status/login", response_class=HTMLResponse)
    async def login(request: Request) -> Response:
        token = (await form(request)).get("token", "")
        return await run_in_threadpool(do_login, request, token)

    def do_login(request: Request, token: str) -> Response:
        if not sessions.auth:
            return RedirectResponse("/", status_code=303)
        client = request.client.host if request.client else "-"
        if not sessions.token_ok(token):
            detail = {"method": "POST", "area": "/status", "reason": "wrong token on the login form"}
            audit.record(
                db, audit.Event("authentication", audit.FAILURE, actor="http", peer=client, detail=detail)
            )
            metrics.HTTP_REFUSED_BY_REASON.labels("token_invalid").inc()
            return render("login.html", request, status_code=401, error="That token is not the node's token.")
        out = RedirectResponse("/", status_code=303)
        out.set_cookie(
            COOKIE,
            sessions.issue(),
            max_age=MAX_AGE_SECONDS,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return out

    @router.post("/status/logout")
    def logout() -> Response:
        out = RedirectResponse("/status/login" if sessions.auth else "/", status_code=303)
        out.delete_cookie(COOKIE, path="/")
        return out

    @router.get("/status/static/{name}")
    def static(name: str) -> Response:
        types = {"status.css": "text/css", "status.js": "text/javascript"}
        if name not in types:
            raise HTTPException(404, "no such file")
        return Response((STATIC / name).read_bytes(), media_type=types[name])

    return router


async def form(request: Request, limit: int = 4096) -> dict[str, str]:
    """A small application/x-www-form-urlencoded body (no python-multipart needed)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, "form too large")
    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}


def _headers() -> dict[str, str]:
    return {
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        "Referrer-Policy": "same-origin",
    }


def _audit(
    db: Database,
    client: str,
    outcome: str,
    result: str,
    action: str,
    job_id: int | None = None,
    study_uid: str | None = None,
    count: int | None = None,
) -> None:
    audit.user_action(db, action, "status page", outcome, result, client, job_id, study_uid, count)
