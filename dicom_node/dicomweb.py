"""The DICOMweb receiver: STOW-RS (`POST /dicom-web/studies[/{study}]`), streamed.

The request body (multipart/related; type="application/dicom") is parsed as it arrives;
each part goes straight to a temporary file in the spool and is stored by `Receiver` like
a C-STORE instance (durable before it is reported stored, deduplicated, UIDs checked).
The response is the Store Instances Response Module (PS3.18 10.5.3) as DICOM JSON:
200 all stored, 202 some failed, 409 none stored, 503 (with Retry-After) none stored because
the spool disk is almost full; 415 for a body that is not multipart/related
application/dicom, 400 for a malformed one.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from dicom_node import audit
from dicom_node.header import InvalidInstanceError, check_uid
from dicom_node.ingest import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    Outcome,
    Receiver,
    Source,
    StoreResult,
    TransferSummary,
    summary_line,
)
from dicom_node.multipart import (
    MultipartError,
    MultipartParser,
    PartData,
    PartEnd,
    PartStart,
    parse_content_type,
)

DICOM_JSON = "application/dicom+json"
RETRY_AFTER_SECONDS = 60

log = logging.getLogger("nodal.stow")


def stow_router(receiver: Receiver) -> APIRouter:
    router = APIRouter(tags=["DICOMweb"])

    @router.post("/dicom-web/studies")
    async def stow(request: Request) -> JSONResponse:
        return await _stow(request, receiver, None)

    @router.post("/dicom-web/studies/{study}")
    async def stow_study(study: str, request: Request) -> JSONResponse:
        try:
            uid = check_uid(study, "Study Instance UID in the URL")
        except InvalidInstanceError as e:
            return _problem(400, str(e))
        return await _stow(request, receiver, uid)

    return router


def _problem(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _stow(request: Request, receiver: Receiver, study: str | None) -> JSONResponse:
    ctype, params = parse_content_type(request.headers.get("content-type", ""))
    if ctype != "multipart/related":
        return _problem(415, 'expected Content-Type multipart/related; type="application/dicom"')
    if params.get("type", "application/dicom").lower() != "application/dicom":
        return _problem(
            415, "only application/dicom parts are accepted (not DICOM JSON or XML with bulk data)"
        )
    try:
        parser = MultipartParser(params.get("boundary", ""))
    except MultipartError as e:
        return _problem(400, str(e))
    transfer = f"stow-{uuid.uuid4().hex}"
    source = Source(via="stow", transfer_id=transfer, peer_host=request.client.host if request.client else "")
    receiver.transfers.begin(transfer)
    results: list[StoreResult] = []
    complete = False
    part: _Part | None = None
    try:
        async for chunk in request.stream():
            for ev in parser.feed(chunk):
                if isinstance(ev, PartStart):
                    part = _Part.open(receiver, ev.headers)
                elif isinstance(ev, PartData) and part is not None:
                    part.write(ev.data)
                elif isinstance(ev, PartEnd) and part is not None:
                    results.append(await part.finish(receiver, source, study))
                    part = None
        parser.close()
        complete = True
    except MultipartError as e:
        return _problem(
            400, f"malformed multipart body: {e} ({len(results)} instance(s) before it were processed)"
        )
    finally:
        if part is not None:
            part.abandon(receiver)
        summary = await run_in_threadpool(receiver.release, transfer, complete)
        if summary is not None:
            await run_in_threadpool(_report, receiver, source, summary, complete)
    if not results:
        return _problem(400, "the request holds no parts")
    return _response(results)


def _report(receiver: Receiver, source: Source, summary: TransferSummary, complete: bool) -> None:
    """One log line per request; one audit event per study it brought."""
    how = "complete" if complete else "cut short"
    log.info(
        "STOW-RS request from %s %s: %s",
        source.peer_host,
        how,
        summary_line(summary),
        extra={"event": "stow_request", "outcome": how},
    )
    for uid, n in summary.studies.items():
        audit.record(
            receiver.db,
            audit.Event(
                "instances_stored",
                actor="stow",
                peer=source.peer_host,
                study_key=audit.study_key(uid),
                count=n,
                detail={"receiver": "stow", "request": how},
            ),
        )


class _Part:
    """One body part on its way to the spool's temporary folder."""

    def __init__(
        self, path: Path | None, fd: int | None, refusal: str | None, status: int = CANNOT_UNDERSTAND
    ):
        self.path, self.fd, self.refusal, self.status = path, fd, refusal, status

    @classmethod
    def open(cls, receiver: Receiver, headers: dict[str, str]) -> _Part:
        ctype = headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
        if ctype != "application/dicom":
            return cls(None, None, f"part Content-Type {ctype} is not application/dicom")
        if receiver.min_free_bytes and receiver.spool.free_bytes() < receiver.min_free_bytes:
            return cls(None, None, "spool disk almost full", OUT_OF_RESOURCES)
        path = receiver.spool.temp_path()
        return cls(path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640), None)

    def write(self, data: bytes) -> None:
        if self.fd is not None:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]

    async def finish(self, receiver: Receiver, source: Source, study: str | None) -> StoreResult:
        if self.fd is None or self.path is None:
            return StoreResult(Outcome.REFUSED, self.status, None, self.refusal or "")
        os.close(self.fd)
        self.fd = None
        return await run_in_threadpool(receiver.store_temp, self.path, source, study)

    def abandon(self, receiver: Receiver) -> None:
        if self.fd is not None:
            os.close(self.fd)
        if self.path is not None:
            receiver.spool.discard(self.path)


def _response(results: list[StoreResult]) -> JSONResponse:
    stored, failed = [], []
    for r in results:
        item: dict = {}
        if r.header is not None:
            item["00081150"] = {"vr": "UI", "Value": [r.header.sop_class_uid]}
            item["00081155"] = {"vr": "UI", "Value": [r.header.sop_instance_uid]}
        if r.outcome is Outcome.REFUSED:
            item["00081197"] = {"vr": "US", "Value": [r.status]}
            failed.append(item)
        else:
            stored.append(item)
    body: dict = {}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": stored}
    if not failed:
        return JSONResponse(body, status_code=200, media_type=DICOM_JSON)
    if stored:
        return JSONResponse(body, status_code=202, media_type=DICOM_JSON)
    if any(r.status == OUT_OF_RESOURCES for r in results):  # transient: the sender should retry
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        return JSONResponse(body, status_code=503, media_type=DICOM_JSON, headers=headers)
    return JSONResponse(body, status_code=409, media_type=DICOM_JSON)
