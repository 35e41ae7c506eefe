"""The DICOMweb receiver: STOW-RS (`POST /dicom-web/studies[/{study}]`), streamed.

The request body (multipart/related; type="application/dicom") is parsed as it arrives;
each part goes straight to a temporary file in the spool and is stored by `Receiver` like
a C-STORE instance (durable before it is reported stored, deduplicated, UIDs checked).
The response is the Store Instances Response Module (PS3.18 10.5.3) as DICOM JSON:
200 all stored, 202 some failed, 409 none stored, 503 (with Retry-After) none stored because
the spool disk is almost full; 415 for a body that is not multipart/related
application/dicom, 400 for a malformed one, 406 when Accept names neither DICOM JSON nor
DICOM XML. The response is DICOM XML when Accept prefers it, DICOM JSON otherwise.

What real clients send is accepted (tests/peers/test_stow_clients.py): boundaries longer than
RFC 2046's 70 characters (Orthanc's are 73), quoted or not; chunked bodies; parts with or
without Content-Length; the `type` parameter quoted, unquoted or absent. Every request
refused as a whole is logged at WARNING with the client's address and the reason, and
counted in `nodal_http_refused_total{reason}`.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from xml.sax.saxutils import escape

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydicom.datadict import keyword_for_tag
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from dicom_node.observe import audit, metrics
from dicom_node.receive.contract import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, Outcome, Source, StoreResult
from dicom_node.receive.multipart import (
    MultipartError,
    MultipartParser,
    PartData,
    PartEnd,
    PartStart,
    parse_content_type,
)
from dicom_node.receive.receiver import Receiver
from dicom_node.receive.transfers import TransferSummary, summary_line
from dicom_node.spool.header import InvalidInstanceError, check_uid

DICOM_JSON = "application/dicom+json"
DICOM_XML = "application/dicom+xml"
RETRY_AFTER_SECONDS = 60
# Accept media ranges answered in DICOM JSON (the default) and in DICOM XML.
JSON_RANGES = frozenset({DICOM_JSON, "application/json", "*/*", "application/*"})
XML_RANGES = frozenset({DICOM_XML, "application/xml", "text/xml"})

log = logging.getLogger("nodal.stow")


def stow_router(receiver: Receiver) -> APIRouter:
    router = APIRouter(tags=["DICOMweb"])

    # with and without the trailing slash: a redirect would lose a streamed body
    @router.post("/dicom-web/studies")
    @router.post("/dicom-web/studies/", include_in_schema=False)
    async def stow(request: Request) -> Response:
        return await _stow(request, receiver, None)

    @router.post("/dicom-web/studies/{study}")
    async def stow_study(study: str, request: Request) -> Response:
        try:
            uid = check_uid(study, "Study Instance UID in the URL")
        except InvalidInstanceError as e:
            return _refuse(request, 400, "study_uid", str(e))
        return await _stow(request, receiver, uid)

    return router


def _problem(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _client(request: Request) -> str:
    return request.client.host if request.client else "-"


def _refuse(request: Request, status: int, reason: str, message: str) -> JSONResponse:
    """A request refused as a whole: logged, counted, answered."""
    _log_refusal(request, status, reason, message)
    return _problem(status, message)


def _log_refusal(request: Request, status: int, reason: str, message: str) -> None:
    """WARNING with the client and the reason (not the URL: it may hold a UID), and the count."""
    log.warning(
        "STOW-RS request from %s refused with %d (%s): %s",
        _client(request),
        status,
        reason,
        message,
        extra={"event": "http_refused", "reason": reason, "status": status},
    )
    metrics.HTTP_REFUSED_BY_REASON.labels(reason).inc()


def response_format(accept: str) -> str | None:
    """DICOM_JSON or DICOM_XML for an Accept header (JSON unless XML is preferred), None if neither."""
    best: tuple[float, str] | None = None
    for item in accept.split(","):
        media, *params = (p.strip() for p in item.split(";"))
        media = media.lower()
        q = 1.0
        for p in params:
            name, _, value = p.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        fmt = DICOM_JSON if media in JSON_RANGES else DICOM_XML if media in XML_RANGES else None
        if fmt and q > 0 and (best is None or q > best[0] or (q == best[0] and fmt == DICOM_JSON)):
            best = (q, fmt)
    return best[1] if best else None


async def _stow(request: Request, receiver: Receiver, study: str | None) -> Response:
    accept = request.headers.get("accept", "").strip()
    fmt = response_format(accept) if accept else DICOM_JSON
    if fmt is None:
        return _refuse(
            request, 406, "not_acceptable", f"the response is {DICOM_JSON} or {DICOM_XML}, not {accept[:200]}"
        )
    ctype, params = parse_content_type(request.headers.get("content-type", ""))
    if ctype != "multipart/related":
        return _refuse(
            request, 415, "media_type", 'expected Content-Type multipart/related; type="application/dicom"'
        )
    if params.get("type", "application/dicom").lower() != "application/dicom":
        return _refuse(
            request,
            415,
            "media_type",
            "only application/dicom parts are accepted (not DICOM JSON or XML with bulk data)",
        )
    try:
        parser = MultipartParser(params.get("boundary", ""))
    except MultipartError as e:
        return _refuse(request, 400, "boundary", str(e))
    transfer = f"stow-{uuid.uuid4().hex}"
    source = Source(via="stow", transfer_id=transfer, peer_host=_client(request))
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
                    part.write(ev.data)  # type: ignore[arg-type]
                elif isinstance(ev, PartEnd) and part is not None:
                    results.append(await part.finish(receiver, source, study))
                    part = None
        parser.close()
        complete = True
    except MultipartError as e:
        return _refuse(
            request,
            400,
            "malformed_body",
            f"malformed multipart body: {e} ({len(results)} instance(s) before it were processed)",
        )
    except ClientDisconnect:
        log.warning(
            "STOW-RS request from %s: the client went away after %d instance(s)",
            source.peer_host,
            len(results),
            extra={"event": "stow_request", "outcome": "client went away"},
        )
        return _problem(400, "the client went away")  # nobody reads it
    finally:
        if part is not None:
            part.abandon(receiver)
        summary = await run_in_threadpool(receiver.release, transfer, complete)
        if summary is not None:
            await run_in_threadpool(_report, receiver, source, summary, complete)
    if not results:
        return _refuse(request, 400, "no_parts", "the request holds no parts")
    response = _response(results, fmt)
    if response.status_code in (409, 503):
        reason = "nothing_stored" if response.status_code == 409 else "out_of_resources"
        why = "; ".join(sorted({r.reason for r in results if r.reason}))[:500]
        _log_refusal(
            request, response.status_code, reason, f"none of {len(results)} instance(s) stored: {why}"
        )
    return response


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


def _response(results: list[StoreResult], fmt: str = DICOM_JSON) -> Response:
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
    headers = {}
    if not failed:
        status = 200
    elif stored:
        status = 202
    elif any(r.status == OUT_OF_RESOURCES for r in results):  # transient: the sender should retry
        status, headers = 503, {"Retry-After": str(RETRY_AFTER_SECONDS)}
    else:
        status = 409
    if fmt == DICOM_XML:
        return Response(dicom_xml(body), status_code=status, media_type=DICOM_XML, headers=headers)
    return JSONResponse(body, status_code=status, media_type=DICOM_JSON, headers=headers)


def dicom_xml(dataset: dict) -> str:
    """A DICOM JSON dataset (PS3.18 F.2) as the Native DICOM Model (PS3.19 A.1)."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">'
        + _xml_attributes(dataset)
        + "</NativeDicomModel>\n"
    )


def _xml_attributes(dataset: dict) -> str:
    out = []
    for tag, element in sorted(dataset.items()):
        vr = element["vr"]
        keyword = keyword_for_tag(int(tag, 16))
        out.append(f'<DicomAttribute tag="{tag}" vr="{vr}" keyword="{keyword}">')
        for n, value in enumerate(element.get("Value", []), 1):
            if vr == "SQ":
                out.append(f'<Item number="{n}">{_xml_attributes(value)}</Item>')
            else:
                out.append(f'<Value number="{n}">{escape(str(value))}</Value>')
        out.append("</DicomAttribute>")
    return "".join(out)
