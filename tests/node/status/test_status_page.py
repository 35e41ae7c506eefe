"""The status page at `/`: what it shows, that it escapes, its login cookie, the retry button
and its protection against cross-site requests (FastAPI's TestClient over a real index)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from sqlalchemy import select

from dicom_node.api.app import create_app
from dicom_node.config import Settings
from dicom_node.index.db import AuditEvent, Database, Delivery, Instance, Job, Series, Study, now
from dicom_node.observe import audit
from dicom_node.receive.contract import Source
from dicom_node.receive.receiver import Receiver
from dicom_node.spool.store import Spool
from dicom_node.status import views
from dicom_node.status.session import COOKIE, MAX_AGE_SECONDS, Sessions, same_origin
from tests.helpers.dicom import part10

TOKEN = "tok-3c9a1e7d5b2f4a60"
DONE, SKIPPED, DOWN = "1.2.826.0.1.1", "1.2.826.0.1.2", "1.2.826.0.1.3"


def fill(db: Database) -> dict[str, int]:
    """Three studies: analysed and delivered, skipped, destination down (delivery failed)."""
    t = now()
    ids = {}
    with db.session() as s:
        for i, uid in enumerate((DONE, SKIPPED, DOWN)):
            s.add(
                Study(
                    study_uid=uid,
                    first_received_at=t - 60 + i,
                    last_received_at=t - 50 + i,
                    pending=False,
                    completed_at=t - 40,
                    instance_count=40,
                )
            )
            s.flush()
            s.add(
                Series(
                    series_uid=uid + ".1",
                    study_uid=uid,
                    modality="CT",
                    description="<b>Thorax</b>",
                    instance_count=40,
                    pending=False,
                    last_received_at=t - 50,
                    calling_ae="CT1",
                    routing="rule ct-axial matched" if uid != SKIPPED else "slice thickness 8 mm > 5 mm",
                )
            )
            s.flush()
            job = Job(
                study_uid=uid,
                series_uid=uid + ".1",
                state="skipped" if uid == SKIPPED else "done",
                rule=None if uid == SKIPPED else "ct-axial",
                reason="slice thickness 8 mm > 5 mm" if uid == SKIPPED else None,
                created_at=t - 40,
                finished_at=t - 10,
                started_at=t - 30,
                findings=None if uid == SKIPPED else 3,
                malignant=None if uid == SKIPPED else 1,
                seconds=None if uid == SKIPPED else json.dumps({"load": 1.0, "segment": 12.5}),
            )
            s.add(job)
            s.flush()
            ids[uid] = job.id
            if uid != SKIPPED:
                s.add(
                    Delivery(
                        job_id=job.id,
                        destination="pacs",
                        sop_uid=uid + ".9.1",
                        sop_class_uid="1.2",
                        file=f"job/{job.id}/seg.dcm",
                        state="delivered" if uid == DONE else "failed",
                        attempts=1 if uid == DONE else 5,
                        created_at=t - 10,
                        expires_at=t + 3600,
                        delivered_at=t - 5 if uid == DONE else None,
                        last_error=None if uid == DONE else "connection refused by 127.0.0.1:1",
                    )
                )
    audit.record(
        db,
        audit.Event(
            "association",
            audit.FAILURE,
            actor="EVIL<script>",
            peer="127.0.0.9",
            detail={"reason": "calling AE not allowed"},
        ),
    )
    return ids


def secondary_capture(path: Path) -> None:
    """An 8-bit RGB image of 64 x 48 pixels, as the result-image writer stores them."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PlanarConfiguration = 48, 64, 3, 0
    ds.PhotometricInterpretation = "RGB"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = np.full((48, 64, 3), 200, np.uint8).tobytes()
    path.parent.mkdir(parents=True)
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def node(tmp_path, request):
    db = Database(f"sqlite:///{tmp_path / 'i.sqlite3'}")
    spool = Spool(tmp_path / "spool")
    receiver = Receiver(spool, db)
    config: dict = {
        "node": {"data_dir": str(tmp_path)},
        "status_page": {"viewer_url": "http://viewer.test/v?StudyInstanceUIDs={StudyInstanceUID}"},
    }
    if getattr(request, "param", None) == "token":
        (tmp_path / "token").write_text(TOKEN + "\n")
        config["node"]["http_auth"] = {"token_file": str(tmp_path / "token")}
    settings = Settings.model_validate(config)
    ids = fill(db)
    with db.session() as s:
        s.get(Job, ids[DONE]).result_dir = "r/1"
    secondary_capture(tmp_path / "outbox" / "r" / "1" / "sc-001.dcm")
    with TestClient(
        create_app(settings, db, receiver, ready=lambda: True), base_url="http://nodal.test"
    ) as c:
        c.db, c.ids, c.receiver = db, ids, receiver  # type: ignore[attr-defined]
        yield c
    receiver.close()
    spool.close()
    db.close()


ORIGIN = {"Origin": "http://nodal.test"}


def test_page_shows_studies_health_refusals_and_escapes(node):
    r = node.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    for uid in (DONE, SKIPPED, DOWN):
        assert uid in html
    assert "slice thickness 8 mm &gt; 5 mm" in html and "skipped" in html
    assert "pacs: delivered" in html and "pacs: failed" in html
    assert "3 (1)" in html  # nodes found (called malignant)
    assert "index_writable" in html and "ready" in html
    assert "&lt;b&gt;Thorax&lt;/b&gt;" in html and "<b>Thorax</b>" not in html
    assert "EVIL&lt;script&gt;" in html and "calling AE not allowed" in html
    assert "nodal-ln-demo" in html  # the model card
    assert '"status_page"' in html or "status_page" in html  # the effective configuration
    assert (
        r.headers["cache-control"] == "no-store"
        and "frame-ancestors 'none'" in r.headers["content-security-policy"]
    )
    assert node.get("/status/static/status.css").status_code == 200
    assert node.get("/status/static/status.js").headers["content-type"].startswith("text/javascript")
    assert node.get("/status/static/..%2Fviews.py").status_code == 404


def test_data_json_for_polling(node):
    d = node.get("/status/data.json").json()
    assert d["studies"]["total"] == 3 and [s["study_instance_uid"] for s in d["studies"]["studies"]] == [
        DOWN,
        SKIPPED,
        DONE,
    ]
    down = d["studies"]["studies"][0]
    assert (
        down["deliveries"]["pacs"]["state"] == "failed" and down["findings"] == 3 and down["malignant"] == 1
    )
    assert down["viewer_url"] == "http://viewer.test/v?StudyInstanceUIDs=" + DOWN
    skipped = d["studies"]["studies"][1]
    assert skipped["series"][0]["routed"] is False and skipped["jobs"][0]["state"] == "skipped"
    assert d["live"]["queued"] == 0 and d["live"]["deliveries_failed"] == 1 and d["live"]["studies"] == 3
    assert d["refusals"][0]["kind"] == "DIMSE association"
    assert d["health"]["ready"] in (True, False) and {c["name"] for c in d["health"]["checks"]} >= {
        "index_writable"
    }


def test_study_detail_and_retry_with_csrf(node):
    job_id = node.ids[DOWN]
    html = node.get(f"/status/studies/{DOWN}").text
    assert "connection refused by 127.0.0.1:1" in html and f"Retry job #{job_id}" in html
    assert "http://viewer.test/v?StudyInstanceUIDs=" + DOWN in html
    csrf = html.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    # no Origin/Referer, or another site's, or no token: refused and audited
    assert node.post(f"/status/jobs/{job_id}/retry", data={"csrf": csrf}).status_code == 403
    other = {"Origin": "http://evil.test"}
    assert node.post(f"/status/jobs/{job_id}/retry", data={"csrf": csrf}, headers=other).status_code == 403
    assert node.post(f"/status/jobs/{job_id}/retry", data={"csrf": "x"}, headers=ORIGIN).status_code == 403
    r = node.post(f"/status/jobs/{job_id}/retry", data={"csrf": csrf}, headers=ORIGIN, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith(f"/status/studies/{DOWN}?message=")
    with node.db.session() as s:
        assert s.scalars(select(Delivery.state).where(Delivery.job_id == job_id)).all() == ["pending"]
        events = s.scalars(select(AuditEvent).where(AuditEvent.event == "user_action")).all()
    assert [(e.outcome, e.job_id) for e in events] == [("failure", job_id)] * 3 + [("success", job_id)]
    # nothing left to retry: 409
    assert node.post(f"/status/jobs/{job_id}/retry", data={"csrf": csrf}, headers=ORIGIN).status_code == 409
    assert node.get("/status/studies/1.2.3.404").status_code == 404


def test_result_images_as_thumbnails(node):
    job_id = node.ids[DONE]
    html = node.get(f"/status/studies/{DONE}").text
    src = f"/status/jobs/{job_id}/images/sc-001.png"
    assert f'src="{src}"' in html
    r = node.get(src)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (64, 48)
    for bad in ("sc-002.png", "sc-001.dcm", "..%2F..%2Fi.sqlite3", "sr.png"):
        assert node.get(f"/status/jobs/{job_id}/images/{bad}").status_code == 404, bad
    assert node.get(f"/status/jobs/{node.ids[DOWN]}/images/sc-001.png").status_code == 404


def test_paging_bounds(node):
    assert node.get("/?offset=2").status_code == 200
    d = node.get("/status/data.json?offset=2").json()
    assert len(d["studies"]["studies"]) == 1 and d["studies"]["offset"] == 2
    assert node.get("/status/data.json?offset=-1").status_code == 422


@pytest.mark.parametrize("node", ["token"], indirect=True)
def test_login_cookie_opens_the_page_not_the_api(node):
    r = node.get("/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/status/login"
    assert node.get("/status/data.json").status_code == 401
    form = node.get("/status/login")
    assert form.status_code == 200 and "Log out" not in form.text and 'name="token"' in form.text
    assert node.get("/status/static/status.css").status_code == 200
    bad = node.post("/status/login", data={"token": "wrong"}, follow_redirects=False)
    assert bad.status_code == 401 and COOKIE not in bad.cookies
    ok = node.post("/status/login", data={"token": TOKEN}, follow_redirects=False)
    assert ok.status_code == 303
    set_cookie = ok.headers["set-cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=strict" in set_cookie.replace("Strict", "strict")
    assert TOKEN not in set_cookie and TOKEN not in ok.headers["location"]
    assert node.get("/").status_code == 200 and node.get("/status/data.json").status_code == 200
    assert "Log out" in node.get("/").text
    assert node.get("/api/jobs").status_code == 401  # the cookie is for the page, not the API
    assert node.get("/status/data.json", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    node.post("/status/logout")
    node.cookies.clear()
    assert node.get("/status/data.json").status_code == 401
    with node.db.session() as s:
        refused = s.scalars(select(AuditEvent.detail).where(AuditEvent.event == "authentication")).all()
    assert any("login form" in d for d in refused)


def test_sessions_expire_and_are_bound_to_the_token():
    a, b = Sessions("one"), Sessions("two")
    c = a.issue(1000.0)
    assert a.valid(c, 1000.0 + 60) and not a.valid(c, 1000.0 + MAX_AGE_SECONDS + 1)
    assert not b.valid(c, 1000.0 + 60) and not a.valid("1000.forged", 1000.0) and not a.valid(None)
    assert a.csrf_ok(c, a.csrf(c)) and not a.csrf_ok(c, b.csrf(c)) and not a.csrf_ok(c, a.csrf(None))
    assert same_origin({"origin": "http://h:8080"}, "h:8080")
    assert same_origin({"referer": "https://h:8080/status/studies/1"}, "h:8080")
    assert not same_origin({"origin": "http://h.evil:8080"}, "h:8080") and not same_origin({}, "h:8080")
    assert not same_origin({"origin": "null"}, "h:8080")


def test_views_without_studies(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'e.sqlite3'}")
    assert views.studies_page(db)["studies"] == [] and views.refusals(db) == []
    assert views.live(db, now(), 300)["oldest_waiting_seconds"] is None
    assert views.study_detail(db, "1.2") is None
    db.close()


def test_page_can_be_switched_off(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'off.sqlite3'}")
    spool = Spool(tmp_path / "spool")
    receiver = Receiver(spool, db)
    settings = Settings.model_validate({"status_page": {"enabled": False}})
    with TestClient(create_app(settings, db, receiver, ready=lambda: True)) as c:
        assert c.get("/").status_code == 404 and c.get("/status/data.json").status_code == 404
        assert c.get("/api/jobs").status_code == 200
    receiver.close()
    spool.close()
    db.close()


@pytest.mark.parametrize("show", [False, True])
def test_accession_number_shown_patient_only_when_configured(tmp_path, show):
    db = Database(f"sqlite:///{tmp_path / 'p.sqlite3'}")
    spool = Spool(tmp_path / "spool")
    receiver = Receiver(spool, db)
    fill(db)
    with db.session() as s:  # as an index written with show_patient on left it
        st = s.get(Study, DONE)
        st.accession_number, st.patient_name, st.patient_id = "ACC<1>", "Doe^Jane", "PID-77"
    settings = Settings.model_validate(
        {"node": {"data_dir": str(tmp_path)}, "status_page": {"show_patient": show}}
    )
    with TestClient(create_app(settings, db, receiver, ready=lambda: True)) as c:
        texts = [c.get("/").text, c.get(f"/status/studies/{DONE}").text, c.get("/status/data.json").text]
        data = c.get("/status/data.json").json()["studies"]["studies"]
    assert "ACC&lt;1&gt;" in texts[0] and "ACC&lt;1&gt;" in texts[1] and "ACC<1>" not in texts[0]
    assert next(s for s in data if s["study_instance_uid"] == DONE)["accession_number"] == "ACC<1>"
    for text in texts:
        assert ("Doe^Jane" in text and "PID-77" in text) is show
    assert all(("patient_name" in s) is show for s in data)
    receiver.close()
    spool.close()
    db.close()


def in_spool(node, study_uid: str, n: int = 2) -> None:
    """`n` instances of the study's series stored through the receiver, the study complete."""
    for i in range(n):
        node.receiver.store_bytes(
            part10(sop=f"{study_uid}.5.{i}", study=study_uid, series=study_uid + ".1"),
            Source("dimse", "t-" + study_uid),
        )
    assert node.receiver.flush(10)
    with node.db.session() as s:
        s.get(Study, study_uid).pending = False
        s.get(Series, study_uid + ".1").pending = False


def test_reprocess_button_new_job_from_the_spool_csrf_and_audit(node):
    old = node.ids[DONE]
    html = node.get(f"/status/studies/{DONE}").text
    assert "Reprocess the study" in html
    csrf = html.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    url = f"/status/studies/{DONE}/reprocess"
    # nothing in the spool (the fixture's index has no instance rows): refused, clearly
    r = node.post(url, data={"csrf": csrf}, headers=ORIGIN)
    assert r.status_code == 409 and "no longer in the spool" in r.text and 'role="alert"' in r.text
    in_spool(node, DONE)
    assert node.post(url, data={"csrf": csrf}).status_code == 403  # no Origin
    assert node.post(url, data={"csrf": "x"}, headers=ORIGIN).status_code == 403
    r = node.post(url, data={"csrf": csrf}, headers=ORIGIN, follow_redirects=False)
    assert r.status_code == 303 and "reprocessing" in r.headers["location"]
    with node.db.session() as s:
        jobs = s.scalars(select(Job).where(Job.study_uid == DONE).order_by(Job.id)).all()
        delivered = s.scalars(select(Delivery.state).where(Delivery.job_id == old)).all()
    assert [(j.id == old, j.state) for j in jobs] == [(True, "superseded"), (False, "queued")]
    new = jobs[1]
    assert (new.series_uid, new.rule, new.instance_count, jobs[0].superseded_by) == (
        DONE + ".1",
        "ct-axial",
        2,
        new.id,
    )
    assert delivered == ["delivered"]  # the earlier results stay
    page = node.get(r.headers["location"]).text
    assert f"#{new.id}" in page and "is queued; wait until it has finished" in page
    assert "Reprocess the study" not in page
    again = node.post(url, data={"csrf": csrf}, headers=ORIGIN)
    assert again.status_code == 409 and f"job {new.id} of this study is queued" in again.text
    with node.db.session() as s:
        events = s.scalars(select(AuditEvent).where(AuditEvent.event == "user_action")).all()
    actions = [(e.outcome, json.loads(e.detail)["action"], e.count) for e in events]
    assert actions == [("failure", "reprocess", None)] * 3 + [
        ("success", "reprocess", 1),
        ("failure", "reprocess", None),
    ]
    assert all(e.study_key == audit.study_key(DONE) and DONE not in e.detail for e in events)
    assert (
        node.post("/status/studies/1.2.404/reprocess", data={"csrf": csrf}, headers=ORIGIN).status_code == 404
    )


def test_reprocess_refused_once_retention_purged_the_study_and_for_skipped_studies(node):
    in_spool(node, DOWN)
    with node.db.session() as s:
        s.get(Study, DOWN).purged_at = now()
    html = node.get(f"/status/studies/{DOWN}").text
    assert "Reprocess the study" not in html and "retention removed them" in html
    csrf = html.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    r = node.post(f"/status/studies/{DOWN}/reprocess", data={"csrf": csrf}, headers=ORIGIN)
    assert r.status_code == 409 and "send the study to nodal again" in r.text
    assert "nothing to reprocess" in node.get(f"/status/studies/{SKIPPED}").text


def test_reprocess_in_the_api(node):
    assert node.post("/api/studies/1.2.404/reprocess").status_code == 404
    r = node.post(f"/api/studies/{SKIPPED}/reprocess")
    assert r.status_code == 409 and "no series of this study was routed" in r.json()["detail"]
    r = node.post(f"/api/studies/{DOWN}/reprocess")
    assert r.status_code == 409 and "no longer in the spool" in r.json()["detail"]
    in_spool(node, DOWN, 3)
    with node.db.session() as s:
        first = node.receiver.spool.root / s.scalars(select(Instance.path).order_by(Instance.path)).first()
    kept = first.read_bytes()
    first.unlink()  # a file gone from under the index: refused, not analysed with a gap
    r = node.post(f"/api/studies/{DOWN}/reprocess")
    assert r.status_code == 409 and r.json()["detail"].startswith("1 of 3 instance files")
    first.write_bytes(kept)
    r = node.post(f"/api/studies/{DOWN}/reprocess")
    assert r.status_code == 200
    [job] = r.json()["jobs"]
    assert (job["state"], job["series_instance_uid"], job["instances"]) == ("queued", DOWN + ".1", 3)
    assert node.get(f"/api/jobs/{node.ids[DOWN]}").json()["superseded_by"] == job["id"]
    events = node.get("/api/audit?event=user_action").json()["events"]
    assert [(e["outcome"], e["detail"]["via"]) for e in events] == [("success", "api")] + [
        ("failure", "api")
    ] * 3


def test_retry_through_the_api_is_audited_too(node):
    assert node.post(f"/api/jobs/{node.ids[DONE]}/retry").status_code == 409  # nothing failed
    assert node.post(f"/api/jobs/{node.ids[DOWN]}/retry").status_code == 200
    events = node.get("/api/audit?event=user_action").json()["events"]
    assert [(e["outcome"], e["actor"], e["job_id"], e["detail"]["action"]) for e in events] == [
        ("success", "api", node.ids[DOWN], "retry"),
        ("failure", "api", node.ids[DONE], "retry"),
    ]


def test_study_page_shows_what_became_of_the_follow_up(node):
    compared = {
        "outcome": "compared",
        "reason": "",
        "prior_source": "sr",
        "summary": {
            "recist_response": "PD",
            "recist_reason": "sum of target short axes +6.2 mm (>= 20 % and >= 5 mm)",
            "sum_short_axis_mm": {"prior": 18.1, "current": 24.3, "change_percent": 34.3},
            "new_nodes": 1,
        },
    }
    with node.db.session() as s:
        s.get(Job, node.ids[DONE]).followup = json.dumps(compared)
        failed = {"outcome": "query_failed", "reason": "C-FIND <refused>"}
        s.get(Job, node.ids[DOWN]).followup = json.dumps(failed)
    html = node.get(f"/status/studies/{DONE}").text
    assert "RECIST 1.1 nodal response <b>PD</b>" in html and "18.1 → 24.3 mm" in html
    assert "1 new node(s) ≥ 15 mm" in html and "from nodal&#39;s SR in the PACS" in html
    html = node.get(f"/status/studies/{DOWN}").text
    assert "Follow-up: query failed: C-FIND &lt;refused&gt;" in html  # escaped like every value
    assert "Follow-up" not in node.get(f"/status/studies/{SKIPPED}").text


def test_reprocess_in_the_api_analyses_one_reconstruction_of_a_scan(node):
    """Both reconstructions of one scan were analysed (the thin one had failed, the thick one
    stood in, then the thin one was sent again): reprocessing queues the thin one and skips
    the thick one, as completion would with the configured routing."""
    study = "1.2.88"
    scan = {"FrameOfReferenceUID": "1.2.88.9", "AcquisitionDate": "20260301", "AcquisitionTime": "101530"}
    scan |= {"ImageOrientationPatient": ["1", "0", "0", "0", "1", "0"]}
    for series, thickness, n in ((f"{study}.1", "1", 6), (f"{study}.2", "5", 3)):
        for i in range(n):
            node.receiver.store_bytes(
                part10(
                    sop=f"{series}.{i}",
                    study=study,
                    series=series,
                    SliceThickness=thickness,
                    ImagePositionPatient=["0", "0", str(-100.0 - i * 5 * 6 / n)],
                    **scan,
                ),
                Source("dimse", "t-" + study),
            )
    assert node.receiver.flush(10)
    with node.db.session() as s:
        s.get(Study, study).pending = False
        for series, n in ((f"{study}.1", 6), (f"{study}.2", 3)):
            s.get(Series, series).pending = False
            s.add(
                Job(
                    study_uid=study,
                    series_uid=series,
                    state="done",
                    rule="ct-axial",
                    created_at=now(),
                    instance_count=n,
                )
            )
    r = node.post(f"/api/studies/{study}/reprocess")
    assert r.status_code == 200, r.text
    jobs = {j["series_instance_uid"]: j for j in r.json()["jobs"]}
    assert (jobs[f"{study}.1"]["state"], jobs[f"{study}.2"]["state"]) == ("queued", "skipped")
    with node.db.session() as s:
        routing = s.get(Series, f"{study}.2").routing
    assert routing.startswith(f"another reconstruction of the same scan is analysed: series {study}.1 (")
    [event] = node.get("/api/audit?event=user_action").json()["events"]
    assert (
        event["detail"]["result"]
        == f"job(s) #{jobs[f'{study}.1']['id']} queued, #{jobs[f'{study}.2']['id']} skipped"
    )
