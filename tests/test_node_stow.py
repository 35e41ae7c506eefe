"""STOW-RS receiver: streaming multipart parser, per-instance response (PS3.18 10.5.3)."""

import pytest
from fastapi.testclient import TestClient
from test_node_spool import part10

from dicom_node.api import create_app
from dicom_node.config import Settings
from dicom_node.index import Database
from dicom_node.ingest import Receiver
from dicom_node.multipart import MultipartError, MultipartParser, PartData, PartEnd, PartStart
from dicom_node.spool import Spool

BOUNDARY = "nodal-boundary-1234"


def body(parts: list[bytes], ctype="application/dicom") -> bytes:
    out = b"preamble to ignore\r\n"
    for p in parts:
        out += f"--{BOUNDARY}\r\nContent-Type: {ctype}\r\n\r\n".encode() + p + b"\r\n"
    return out + f"--{BOUNDARY}--\r\nepilogue".encode()


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


HEADERS = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'}


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
