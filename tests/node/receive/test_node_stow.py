"""STOW-RS receiver: streaming multipart parser, per-instance response (PS3.18 10.5.3)."""

import logging
from xml.etree import ElementTree

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from dicom_node.api.app import create_app
from dicom_node.config import Settings
from dicom_node.index.db import Database
from dicom_node.observe import metrics
from dicom_node.receive.multipart import (
    MAX_BOUNDARY,
    MultipartError,
    MultipartParser,
    PartData,
    PartEnd,
    PartStart,
    parse_content_type,
)
from dicom_node.receive.receiver import Receiver
from dicom_node.receive.stow import DICOM_JSON, DICOM_XML
from dicom_node.spool.store import Spool
from tests.helpers.dicom import part10
from tests.helpers.stow import BOUNDARY, HEADERS, body


def parse(data: bytes, chunk: int):
    parser = MultipartParser(BOUNDARY)
    events = []
    for i in range(0, len(data), chunk):
        events.extend(parser.feed(data[i : i + chunk]))
    parser.close()
    parts, current = [], None
    for ev in events:
        if isinstance(ev, PartStart):
            current = [ev.headers, b""]
        elif isinstance(ev, PartData):
            current[1] += ev.data
        elif isinstance(ev, PartEnd):
            parts.append(tuple(current))
    return parts


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1 << 20])
def test_parts_survive_any_chunking(chunk):
    payloads = [b"A" * 1000, b"\r\n--nodal-boundary-123 almost a delimiter\r\n", b""]
    parts = parse(body(payloads), chunk)
    assert [p for _, p in parts] == payloads
    assert all(h["content-type"] == "application/dicom" for h, _ in parts)


def test_truncated_body_is_an_error():
    with pytest.raises(MultipartError, match="ended before"):
        parse(body([b"x"])[:-20], 10)


@pytest.fixture
def client(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'i.sqlite3'}")
    spool = Spool(tmp_path / "spool")
    receiver = Receiver(spool, db)
    app = create_app(Settings(), db, receiver, ready=lambda: True)
    with TestClient(app) as c:
        yield c, receiver
    receiver.close()
    spool.close()
    db.close()


def test_stow_stores_each_instance_and_reports_it(client):
    c, receiver = client
    data = body([part10(sop="1.2.3.4.1"), part10(sop="1.2.3.4.2")])
    r = c.post("/dicom-web/studies", content=data, headers=HEADERS)
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom+json"
    stored = r.json()["00081199"]["Value"]
    assert [i["00081155"]["Value"][0] for i in stored] == ["1.2.3.4.1", "1.2.3.4.2"]
    assert (receiver.spool.root / "1.2.3" / "1.2.3.4" / "1.2.3.4.2.dcm").read_bytes() == part10(
        sop="1.2.3.4.2"
    )
    assert not list(receiver.spool.tmp.iterdir())


def test_stow_partial_failure_is_202_with_reasons(client):
    c, _ = client
    data = body([part10(sop="1.2.3.4.1"), b"not dicom at all" * 20, part10(sop="1.2.3.4.9", study="1.2.99")])
    r = c.post("/dicom-web/studies/1.2.3", content=data, headers=HEADERS)
    assert r.status_code == 202
    failed = r.json()["00081198"]["Value"]
    assert [f["00081197"]["Value"][0] for f in failed] == [0xC000, 0x0110]  # unreadable, wrong study
    assert failed[1]["00081155"]["Value"] == ["1.2.3.4.9"]


def test_stow_nothing_stored_is_409_and_bad_requests_are_named(client):
    c, _ = client
    assert c.post("/dicom-web/studies", content=body([b"junk"]), headers=HEADERS).status_code == 409
    r = c.post("/dicom-web/studies", content=b"{}", headers={"Content-Type": "application/json"})
    assert r.status_code == 415
    r = c.post("/dicom-web/studies/..%2F..%2Fetc", content=body([part10()]), headers=HEADERS)
    assert r.status_code in (400, 404)
    r = c.post("/dicom-web/studies", content=body([part10()])[:-30], headers=HEADERS)
    assert r.status_code == 400 and "malformed multipart" in r.json()["error"]


def test_api_lists_studies_and_404s(client):
    c, _ = client
    c.post("/dicom-web/studies", content=body([part10()]), headers=HEADERS)
    studies = c.get("/api/studies").json()
    assert studies["total"] == 1 and studies["studies"][0]["instances"] == 1
    assert c.get("/api/studies/1.2.3").json()["series"][0]["modality"] == "CT"
    assert c.get("/api/jobs/77").status_code == 404
    assert c.post("/api/jobs/77/retry").status_code == 404
    assert c.get("/healthz").json() == {"status": "alive"}
    assert c.get("/readyz").status_code == 200


def test_stow_disk_almost_full_is_503_then_recovers(client):
    c, receiver = client
    receiver.min_free_bytes = receiver.spool.free_bytes() + 2**40  # "almost full"
    r = c.post("/dicom-web/studies", content=body([part10()]), headers=HEADERS)
    assert r.status_code == 503 and r.headers["retry-after"] == "60"
    assert r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA700]
    receiver.min_free_bytes = 0  # space is back
    assert c.post("/dicom-web/studies", content=body([part10()]), headers=HEADERS).status_code == 200


# --- what real clients send (issue 20); tests/peers/test_stow_clients.py sends it with the clients ---

ORTHANC_BOUNDARY = "0d7a4b0e-5c5e-4f7e-9c7e-2f0b1c9d8e7f-6a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"  # 73


@given(
    payloads=st.lists(
        st.lists(
            st.sampled_from(
                [b"\r", b"\n", b"-", b"--", b"\r\n", b"\r\n--", b"x", ORTHANC_BOUNDARY[:40].encode()]
            ),
            max_size=12,
        ).map(b"".join),
        min_size=1,
        max_size=4,
    ),
    cuts=st.lists(st.integers(1, 400), min_size=1, max_size=20),
)
@settings(max_examples=300, deadline=None)
def test_parser_finds_every_part_however_the_body_is_cut(payloads, cuts):
    """Payloads made of delimiter fragments, cut anywhere: the parts come out unchanged."""
    data = (
        b"".join(
            f"--{ORTHANC_BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
            for p in payloads
        )
        + f"--{ORTHANC_BOUNDARY}--\r\n".encode()
    )
    parser = MultipartParser(ORTHANC_BOUNDARY)
    events, at = [], 0
    for n in cuts * (len(data) // sum(cuts) + 1):
        events.extend(parser.feed(data[at : at + n]))
        at += n
        if at >= len(data):
            break
    parser.close()
    parts, current = [], b""
    for ev in events:
        if isinstance(ev, PartStart):
            current = b""
        elif isinstance(ev, PartData):
            current += ev.data
        elif isinstance(ev, PartEnd):
            parts.append(current)
    assert parts == payloads


@pytest.mark.parametrize(
    ("header", "boundary", "type_"),
    [
        (
            f'multipart/related; type="application/dicom"; boundary={ORTHANC_BOUNDARY}',
            ORTHANC_BOUNDARY,
            "application/dicom",
        ),
        (
            f'multipart/related; type=application/dicom; boundary="{ORTHANC_BOUNDARY}"',
            ORTHANC_BOUNDARY,
            "application/dicom",
        ),
        ("Multipart/Related;Boundary=abc;Type=Application/DICOM", "abc", "Application/DICOM"),
    ],
)
def test_content_type_parameters_quoted_or_not(header, boundary, type_):
    ctype, params = parse_content_type(header)
    assert (ctype, params["boundary"], params["type"]) == ("multipart/related", boundary, type_)
    MultipartParser(params["boundary"])


def test_boundary_bounds():
    MultipartParser("b" * MAX_BOUNDARY)
    for bad, why in [
        ("", "no boundary"),
        ("b" * (MAX_BOUNDARY + 1), "characters long"),
        ("a\nb", "printable"),
    ]:
        with pytest.raises(MultipartError, match=why):
            MultipartParser(bad)


def client_body(files: list[bytes], boundary: str, content_length: bool) -> bytes:
    out = b""
    for f in files:
        length = f"Content-Length: {len(f)}\r\n" if content_length else ""
        out += f"--{boundary}\r\nContent-Type: application/dicom\r\n{length}\r\n".encode() + f + b"\r\n"
    return out + f"--{boundary}--".encode()


def refused(reason: str) -> float:
    return metrics.HTTP_REFUSED_BY_REASON.labels(reason)._value.get()


@pytest.mark.parametrize(
    ("ctype", "content_length", "path"),
    [
        (
            f'multipart/related; type="application/dicom"; boundary={ORTHANC_BOUNDARY}',
            False,
            "/dicom-web/studies",
        ),
        (
            f"multipart/related; type=application/dicom; boundary={ORTHANC_BOUNDARY}",
            True,
            "/dicom-web/studies/",
        ),
        (f'multipart/related; boundary="{ORTHANC_BOUNDARY}"', True, "/dicom-web/studies/1.2.3"),
    ],
)
def test_stow_accepts_what_clients_send(client, ctype, content_length, path):
    c, _ = client
    files = [part10(sop=f"1.2.3.4.{n}") for n in range(1, 4)]

    def chunked():  # no Content-Length on the request: Transfer-Encoding chunked
        data = client_body(files, ORTHANC_BOUNDARY, content_length)
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    r = c.post(path, content=chunked(), headers={"Content-Type": ctype, "Accept": DICOM_JSON})
    assert r.status_code == 200, r.text
    stored = r.json()["00081199"]["Value"]
    assert [i["00081155"]["Value"][0] for i in stored] == ["1.2.3.4.1", "1.2.3.4.2", "1.2.3.4.3"]


@pytest.mark.parametrize(
    ("accept", "media_type"),
    [
        ("application/dicom+json", DICOM_JSON),
        ("*/*", DICOM_JSON),
        ("application/json, text/plain, */*", DICOM_JSON),
        ("application/dicom+xml", DICOM_XML),
        ("application/dicom+json; q=0.5, application/dicom+xml", DICOM_XML),
        ('multipart/related; type="application/dicom+xml", application/dicom+json', DICOM_JSON),
    ],
)
def test_stow_answers_in_the_format_accept_asks_for(client, accept, media_type):
    c, _ = client
    r = c.post("/dicom-web/studies", content=body([part10()]), headers={**HEADERS, "Accept": accept})
    assert r.status_code == 200 and r.headers["content-type"].startswith(media_type)
    if media_type == DICOM_XML:
        root = ElementTree.fromstring(r.content)
        ns = "{http://dicom.nema.org/PS3.19/models/NativeDICOM}"
        seq = root.find(f"{ns}DicomAttribute[@tag='00081199']")
        assert seq.get("keyword") == "ReferencedSOPSequence"
        uid = seq.find(f"{ns}Item/{ns}DicomAttribute[@tag='00081155']/{ns}Value")
        assert uid.text == "1.2.3.4.5"


@pytest.mark.parametrize(
    ("path", "headers", "data", "status", "reason"),
    [
        ("/dicom-web/studies", {"Content-Type": "application/json"}, b"{}", 415, "media_type"),
        (
            "/dicom-web/studies",
            {"Content-Type": 'multipart/related; type="application/dicom+xml"; boundary=x'},
            b"",
            415,
            "media_type",
        ),
        (
            "/dicom-web/studies",
            {"Content-Type": "multipart/related; type=application/dicom"},
            b"",
            400,
            "boundary",
        ),
        ("/dicom-web/studies", {**HEADERS, "Accept": "text/html"}, b"", 406, "not_acceptable"),
        ("/dicom-web/studies", HEADERS, f"--{BOUNDARY}--".encode(), 400, "no_parts"),
        (
            "/dicom-web/studies",
            HEADERS,
            b"--" + BOUNDARY.encode() + b"\r\nX\r\n\r\nabc",
            400,
            "malformed_body",
        ),
        ("/dicom-web/studies/1.2.x", HEADERS, b"", 400, "study_uid"),
        ("/dicom-web/studies", HEADERS, None, 409, "nothing_stored"),
    ],
)
def test_every_refused_request_is_logged_and_counted(client, caplog, path, headers, data, status, reason):
    c, _ = client
    before = refused(reason)
    with caplog.at_level(logging.WARNING, logger="nodal.stow"):
        r = c.post(path, content=body([b"junk"]) if data is None else data, headers=headers)
    assert r.status_code == status, r.text
    assert refused(reason) == before + 1
    lines = [rec for rec in caplog.records if getattr(rec, "event", None) == "http_refused"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert lines[0].reason == reason and "testclient" in lines[0].getMessage()


def test_refusal_reasons_exist_from_the_start():
    text = metrics.exposition()[0].decode()
    for reason in metrics.HTTP_REFUSAL_REASONS:
        assert f'nodal_http_refused_total{{reason="{reason}"}}' in text


def test_transport_padding_after_a_boundary_is_ignored():
    data = f"--{BOUNDARY} \t\r\nContent-Type: application/dicom\r\n\r\nabc\r\n--{BOUNDARY}--  \r\n".encode()
    assert [p for _, p in parse(data, 5)] == [b"abc"]
