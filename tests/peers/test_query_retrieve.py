"""nodal's query/retrieve client against a real Orthanc (issue 17): C-FIND, C-GET and C-MOVE
(to nodal's own receiver, kept out of the analysis path) and QIDO-RS/WADO-RS; the prior
search's filters; failures as clear QueryErrors; every operation recorded and audited.
No model needed: small CT series only."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from dicom_node.config import Settings
from dicom_node.index.db import Database, Instance
from dicom_node.observe import audit
from dicom_node.query.client import StudyQuery, make_client
from dicom_node.query.prior import CurrentStudy, candidates, earlier_studies
from dicom_node.query.records import QueryError, Recorder
from tests.helpers.followup import register_modality, small_ct, upload
from tests.helpers.inprocess import dimse_server
from tests.helpers.peers import Orthanc, TlsProxy, free_port, nginx_binary, orthanc_binary

pytestmark = [pytest.mark.peers]

if orthanc_binary() is None:
    pytest.skip("Orthanc missing (`make peers` installs it)", allow_module_level=True)

PATIENT = "QR-PATIENT-1"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc holding: the patient's current study (20260601), two earlier CT studies of the
    chest (20260301 and 20250601), one of the head (20260401), one too old (20200101), and
    another patient's study."""
    root = tmp_path_factory.mktemp("qr")
    o = Orthanc(root / "orthanc").start()
    register_modality(o, "nodal", "NODAL", free_port())  # nodal may query and C-GET
    studies = {}
    for name, pid, date, body in [
        ("current", PATIENT, "20260601", "CHEST"),
        ("prior", PATIENT, "20260301", "CHEST"),
        ("older", PATIENT, "20250601", "CHEST"),
        ("head", PATIENT, "20260401", "HEAD"),
        ("ancient", PATIENT, "20200101", "CHEST"),
        ("other", "QR-PATIENT-2", "20260302", "CHEST"),
    ]:
        paths, study, series = small_ct(root / name, name, pid, date, BodyPartExamined=body)
        upload(o, paths)
        studies[name] = (paths, study, series)
    yield o, studies, root
    o.stop()


def settings_for(root: Path, dest: dict, port: int | None = None) -> Settings:
    return Settings.model_validate(
        {
            "node": {
                "ae_title": "NODAL",
                "data_dir": str(root),
                "dimse_port": port or free_port(),
                "bind_address": "127.0.0.1",
            },
            "destinations": [dest],
            "followup": {"lookback_days": 730},
            "volume": {"min_slices": 8},
        }
    )


def dimse_dest(o: Orthanc, retrieve: str = "get", **query) -> dict:
    return {
        "name": "pacs",
        "kind": "dimse",
        "ae_title": o.aet,
        "host": "127.0.0.1",
        "port": o.dicom_port,
        "query": {"retrieve": retrieve, "timeout_seconds": 60, **query},
    }


def web_dest(o: Orthanc) -> dict:
    return {"name": "web", "kind": "dicomweb", "url": f"{o.url}/dicom-web", "query": {}}


@pytest.fixture(params=["dimse", "dicomweb"])
def client_kind(request):
    return request.param


def test_prior_search_finds_the_patients_comparable_studies_newest_first(pacs, tmp_path, client_kind):
    o, studies, _ = pacs
    dest = dimse_dest(o) if client_kind == "dimse" else web_dest(o)
    s = settings_for(tmp_path, dest)
    recorder = Recorder()
    client = make_client(s, s.query_peer(), recorder)
    current = CurrentStudy(studies["current"][1], PATIENT, "", "20260601", "CHEST", "")
    earlier = earlier_studies(client, current, s.followup)
    # the current study and the one older than the window are left out; other patients too
    assert [e.study_uid for e in earlier] == [studies[n][1] for n in ("head", "prior", "older")]
    found = list(candidates(client, current, s.followup, s.volume.min_slices))
    assert [c.study.study_uid for c in found] == [studies["prior"][1], studies["older"][1]]  # not the head
    assert found[0].ct_series[0].series_uid == studies["prior"][2]
    op = "find" if client_kind == "dimse" else "qido"
    assert {r.operation for r in recorder.operations} == {op}
    assert all(r.outcome == "success" for r in recorder.operations)
    assert recorder.operations[0].matches == 4  # the study query: the patient's studies in the window


def test_find_by_study_uid(pacs, tmp_path, client_kind):
    o, studies, _ = pacs
    s = settings_for(tmp_path, dimse_dest(o) if client_kind == "dimse" else web_dest(o))
    client = make_client(s, s.query_peer(), Recorder())
    [match] = client.find_studies(StudyQuery(study_uid=studies["other"][1]))
    assert match.patient_id == "QR-PATIENT-2" and match.study_date == "20260302"


@pytest.mark.parametrize("retrieve", ["get", "wado"])
def test_retrieve_a_series_into_a_folder(pacs, tmp_path, retrieve):
    o, studies, _ = pacs
    s = settings_for(tmp_path, dimse_dest(o, "get") if retrieve == "get" else web_dest(o))
    db = Database(f"sqlite:///{tmp_path / 'audit.sqlite3'}")
    recorder = Recorder(db, job_id=7, study_key=audit.study_key(studies["prior"][1]))
    client = make_client(s, s.query_peer(), recorder)
    paths, study, series = studies["prior"]
    files = client.retrieve_series(study, series, tmp_path / "got")
    assert sorted(f.name for f in files) == sorted(f"{_sop(p)}.dcm" for p in paths)
    assert _pixels(files[0]) == _pixels(paths[0])  # the instance itself, not a header
    [op] = recorder.operations
    assert op.operation == retrieve and op.instances == len(paths) and op.outcome == "success"
    [ev] = audit.query(db, "retrieve")
    assert ev["count"] == len(paths) and ev["job_id"] == 7 and ev["actor"] == s.query_peer().name
    db.close()


def test_cmove_to_nodal_lands_in_the_holding_folder_not_the_spool(pacs, tmp_path):
    """C-MOVE to nodal's own AE: the instances arrive at nodal's C-STORE receiver, which keeps
    them for the retrieval that waits for them; nothing is indexed, so nothing is analysed."""
    o, studies, _ = pacs
    port = free_port()
    s = settings_for(tmp_path, dimse_dest(o, "move"), port)
    register_modality(o, "nodal", "NODAL", port)  # ... and be a C-MOVE destination, here
    with dimse_server(tmp_path, s.model_dump(mode="json")) as server:
        recorder = Recorder()
        client = make_client(s, s.query_peer(), recorder)
        paths, study, series = studies["older"]
        files = client.retrieve_series(study, series, tmp_path / "retrieve" / "job-1")
        assert sorted(f.name for f in files) == sorted(f"{_sop(p)}.dcm" for p in paths)
        assert not server.holding.waiting()  # the marker is gone once the C-MOVE ended
        server.receiver.flush()
        with server.db.session() as ses:
            assert ses.scalar(select(func.count()).select_from(Instance)) == 0
        # the same series pushed normally (no retrieval waiting) goes to the spool as always
        o_id = _orthanc_series(o, series)
        import requests

        r = requests.post(f"{o.url}/modalities/nodal/store", json={"Resources": [o_id], "Synchronous": True})
        assert r.ok, r.text
        server.receiver.flush()
        with server.db.session() as ses:
            assert ses.scalar(select(func.count()).select_from(Instance)) == len(paths)
    assert recorder.operations[0].operation == "move" and recorder.operations[0].instances == len(paths)


def test_cmove_to_an_unknown_destination_is_a_clear_error(pacs, tmp_path):
    o, studies, _ = pacs
    s = settings_for(tmp_path, dimse_dest(o, "move", move_destination="NOWHERE"))
    recorder = Recorder()
    client = make_client(s, s.query_peer(), recorder)
    _, study, series = studies["older"]
    with pytest.raises(QueryError, match=r"NOWHERE"):
        client.retrieve_series(study, series, tmp_path / "retrieve" / "r")
    assert recorder.operations[0].outcome == "failure" and recorder.operations[0].error


@pytest.mark.parametrize("kind", ["dimse", "dicomweb"])
def test_peer_down_is_a_clear_error(tmp_path, kind):
    port = free_port()
    dest = (
        {"name": "down", "kind": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": port, "query": {}}
        if kind == "dimse"
        else {"name": "down", "kind": "dicomweb", "url": f"http://127.0.0.1:{port}/dicom-web", "query": {}}
    )
    s = settings_for(tmp_path, dest)
    recorder = Recorder()
    t = time.monotonic()
    with pytest.raises(QueryError, match=r"cannot connect|no association|failed: ConnectionError"):
        make_client(s, s.query_peer(), recorder).find_studies(StudyQuery(patient_id="X"))
    assert time.monotonic() - t < 30
    assert recorder.operations[0].outcome == "failure"


def _sop(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _pixels(path: Path) -> bytes:
    import pydicom

    return pydicom.dcmread(path).PixelData


def _orthanc_series(o: Orthanc, series_uid: str) -> str:
    import requests

    found = requests.post(f"{o.url}/tools/lookup", data=series_uid, timeout=10).json()
    return next(f["ID"] for f in found if f["Type"] == "Series")


# -- POST /api/retrieve: a study fetched on request goes through the receiver ----------------


@pytest.fixture
def api(pacs, tmp_path):
    from fastapi.testclient import TestClient

    from dicom_node.api.app import create_app
    from dicom_node.receive.receiver import Receiver
    from dicom_node.spool.store import Spool

    def make(dest: dict | None):
        s = (
            settings_for(tmp_path, dest)
            if dest
            else Settings.model_validate({"node": {"data_dir": str(tmp_path)}})
        )
        db = Database(s.index_url())
        spool = Spool(tmp_path / "spool")
        receiver = Receiver(spool, db)
        made.append((receiver, spool, db))
        return TestClient(create_app(s, db, receiver, lambda: True)), db

    made: list = []
    yield make
    for receiver, spool, db in made:
        receiver.close()
        spool.close()
        db.close()


@pytest.mark.parametrize("kind", ["dimse-get", "dicomweb"])  # C-MOVE: tests/peers/test_followup_peers.py
def test_api_retrieve_stores_the_study_like_received_instances(pacs, api, tmp_path, kind):
    o, studies, _ = pacs
    client, db = api(dimse_dest(o, "get") if kind == "dimse-get" else web_dest(o))
    paths, study, _ = studies["prior"]
    r = client.post("/api/retrieve", json={"study_instance_uid": study})
    assert r.status_code == 202, r.text
    assert r.json()["instances"] == {"stored": len(paths), "duplicate": 0, "refused": 0}
    with db.session() as s:
        vias = s.scalars(select(Instance.via).where(Instance.study_uid == study)).all()
    assert vias == ["retrieve"] * len(paths)
    again = client.post("/api/retrieve", json={"study_instance_uid": study}).json()
    assert again["instances"]["duplicate"] == len(paths) and "already" in again["note"]
    actions = [e for e in audit.query(db, "user_action") if e["detail"].get("action") == "retrieve"]
    assert len(actions) == 2 and all(e["outcome"] == "success" for e in actions)
    assert audit.query(db, "retrieve")[0]["count"] == len(paths)


def test_api_retrieve_by_accession_number_and_its_refusals(pacs, api, tmp_path):
    o, _, root = pacs
    paths, study, _ = small_ct(root / "acc", "acc", "QR-PATIENT-3", "20260505", AccessionNumber="ACC-17")
    upload(o, paths)
    client, db = api(dimse_dest(o, "get"))
    r = client.post("/api/retrieve", json={"accession_number": "ACC-17"})
    assert r.status_code == 202 and r.json()["study_instance_uid"] == study, r.text
    assert client.post("/api/retrieve", json={"accession_number": "NO-SUCH"}).status_code == 404
    both = client.post("/api/retrieve", json={"accession_number": "A", "study_instance_uid": study})
    assert both.status_code == 422
    assert client.post("/api/retrieve", json={"study_instance_uid": "not a uid"}).status_code == 422
    refused = [e for e in audit.query(db, "user_action") if e["outcome"] == "failure"]
    assert refused and refused[0]["detail"]["status"] == 404


def test_api_retrieve_without_a_query_destination_is_409(api):
    client, _ = api(None)
    r = client.post("/api/retrieve", json={"study_instance_uid": "1.2.3"})
    assert r.status_code == 409 and "query role" in r.json()["detail"]


def test_api_retrieve_with_the_pacs_down_is_502(api):
    client, db = api(
        {
            "name": "down",
            "kind": "dimse",
            "ae_title": "X",
            "host": "127.0.0.1",
            "port": free_port(),
            "query": {},
        }
    )
    r = client.post("/api/retrieve", json={"study_instance_uid": "1.2.3"})
    assert r.status_code == 502 and "no association with X@127.0.0.1" in r.json()["detail"]
    assert audit.query(db, "query")[0]["outcome"] == "failure"


def test_a_stale_holding_marker_is_dropped(tmp_path):
    import os

    from dicom_node.query.holding import STALE_SECONDS, Holding

    holding = Holding(tmp_path)
    with holding.expect("1.2.3", tmp_path / "retrieve" / "job-9"):
        assert holding.waiting() and holding.folder_for("1.2.3") == tmp_path / "retrieve" / "job-9"
        marker = holding.expected / "1.2.3"
        old = marker.stat().st_mtime - STALE_SECONDS - 1
        os.utime(marker, (old, old))  # as if its worker was killed an hour ago
        assert holding.folder_for("1.2.3") is None and not holding.waiting()
    assert holding.folder_for("not/a/uid") is None
    left = tmp_path / "retrieve" / "job-9"
    (left / "x.dcm").write_bytes(b"x")
    assert holding.sweep() == 0  # fresh: a retrieval may still be filling it
    os.utime(left, (old, old))
    assert holding.sweep() == 1 and not left.exists() and holding.expected.is_dir()


# -- DICOM TLS, as for sending: the destination's `tls` serves C-FIND and C-GET too -----------


class TlsOrthanc(Orthanc):
    """Orthanc speaking DICOM TLS only, requiring a client certificate from `pki.ca`."""

    def __init__(self, folder: Path, pki):
        super().__init__(folder)
        self.pki = pki

    def config(self) -> dict:
        return {
            **super().config(),
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(self.pki.server_cert),
            "DicomTlsPrivateKey": str(self.pki.server_key),
            "DicomTlsTrustedCertificates": str(self.pki.ca),
            "DicomTlsRemoteCertificateRequired": True,
        }


def test_query_and_retrieve_over_dicom_tls(tmp_path):
    from tests.helpers.tls_certs import have_openssl, make_pki

    if not have_openssl():
        pytest.skip("needs the openssl command")
    pki = make_pki(tmp_path / "pki")
    o = TlsOrthanc(tmp_path / "orthanc-tls", pki).start()
    try:
        register_modality(o, "nodal", "NODAL", free_port())
        paths, study, series = small_ct(tmp_path / "ct", "tls", "QR-TLS", "20260101")
        upload(o, paths)
        tls = {"enabled": True, "ca_file": str(pki.ca), "cert_file": str(pki.client_cert),
               "key_file": str(pki.client_key)}  # fmt: skip
        s = settings_for(tmp_path, {**dimse_dest(o, "get"), "tls": tls})
        client = make_client(s, s.query_peer(), Recorder())
        [match] = client.find_studies(StudyQuery(patient_id="QR-TLS"))
        assert match.study_uid == study
        files = client.retrieve_series(study, series, tmp_path / "retrieve" / "tls")
        assert len(files) == len(paths)
        plain = settings_for(tmp_path, dimse_dest(o, "get"))  # the same peer without TLS
        with pytest.raises(QueryError):
            make_client(plain, plain.query_peer(), Recorder()).find_studies(StudyQuery(patient_id="QR-TLS"))
    finally:
        o.stop()


# -- DICOMweb over https: STOW-RS, QIDO-RS and WADO-RS verify the peer against the CA file ---
# Orthanc behind nginx, as sites run it (Debian's Orthanc 1.10 crashes on its own HTTPS).


def test_dicomweb_over_https_sends_queries_and_retrieves_and_refuses_an_unknown_ca(tmp_path):
    from dicom_node.delivery.senders import DicomwebSender, OrthancSender, Outgoing
    from tests.helpers.tls_certs import have_openssl, make_pki

    if not have_openssl():
        pytest.skip("needs the openssl command")
    if nginx_binary() is None:
        pytest.skip("needs nginx (make peers)")
    pki = make_pki(tmp_path / "pki")
    o = Orthanc(tmp_path / "orthanc").start()
    proxy = TlsProxy(tmp_path / "nginx", o.url, pki.server_cert, pki.server_key).start(pki.ca)
    o.url = proxy.url  # every request below goes over https, through the proxy
    try:
        import pydicom

        paths, study, series = small_ct(tmp_path / "ct", "https", "QR-HTTPS", "20260101")
        items = [
            Outgoing(str(ds.SOPInstanceUID), str(ds.SOPClassUID), p)
            for p, ds in ((p, pydicom.dcmread(p, stop_before_pixels=True)) for p in paths)
        ]
        stow = DicomwebSender(f"{o.url}/dicom-web", ca_file=str(pki.ca))
        assert set(stow.send(items[:6]).values()) == {None}
        rest = OrthancSender(o.url, ca_file=str(pki.ca))  # Orthanc's own REST API, the same CA
        assert set(rest.send(items[6:]).values()) == {None}

        dest = {**web_dest(o), "ca_file": str(pki.ca)}
        s = settings_for(tmp_path, dest)
        client = make_client(s, s.query_peer(), Recorder())
        [match] = client.find_studies(StudyQuery(patient_id="QR-HTTPS"))
        assert match.study_uid == study
        files = client.retrieve_series(study, series, tmp_path / "retrieve" / "https")
        assert sorted(_sop(f) for f in files) == sorted(i.sop_uid for i in items)

        # the system's CAs do not know the test CA: a clear refusal, nothing sent
        untrusted = DicomwebSender(f"{o.url}/dicom-web")
        assert set(untrusted.send(items[:1]).values()) == {f"STOW-RS to {o.url}/dicom-web failed: SSLError"}
        plain = settings_for(tmp_path, web_dest(o))
        with pytest.raises(QueryError, match="SSLError"):
            make_client(plain, plain.query_peer(), Recorder()).find_studies(StudyQuery(patient_id="QR-HTTPS"))
    finally:
        proxy.stop()
        o.stop()
