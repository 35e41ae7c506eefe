"""What the index keeps to label a study: the accession number always, the patient's name and ID
only with `status_page.show_patient`. Instances arrive through real C-STORE (pynetdicom as the
modality) and real STOW-RS requests (the node's HTTP app); nothing about the patient is
stored, shown or returned by the API while the setting is off, and what an earlier run stored
is erased at start."""

from __future__ import annotations

import io
import time

import pydicom
import pytest
from fastapi.testclient import TestClient
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import select, text

from dicom_node.api.app import create_app
from dicom_node.config import Settings
from dicom_node.index.db import Database, Study, forget_patients
from dicom_node.observe import audit
from dicom_node.receive.contract import Source
from dicom_node.receive.indexer import Pending, study_labels
from dicom_node.receive.receiver import Receiver
from dicom_node.receive.reconcile import reconcile
from dicom_node.receive.scp import DimseServer
from dicom_node.spool.header import read_header
from dicom_node.spool.store import Spool
from tests.helpers.dicom import part10
from tests.helpers.peers import free_port
from tests.helpers.stow import HEADERS, body

NAME, PID = "Müller^Jürgen", "PID-0042"
CHARSET = {"SpecificCharacterSet": "ISO_IR 100"}


def instance(sop: str, study: str, accession: str = "ACC-1", **extra) -> bytes:
    return part10(
        sop=sop,
        study=study,
        series=study + ".1",
        AccessionNumber=accession,
        PatientName=NAME,
        PatientID=PID,
        **CHARSET,
        **extra,
    )


@pytest.fixture(params=[False, True], ids=["patient-hidden", "patient-shown"])
def node(tmp_path, request):
    port = free_port()
    settings = Settings.model_validate(
        {
            "node": {"dimse_port": port, "bind_address": "127.0.0.1", "data_dir": str(tmp_path)},
            "status_page": {"show_patient": request.param},
        }
    )
    db = Database(f"sqlite:///{tmp_path / 'i.sqlite3'}")
    spool = Spool(tmp_path / "spool")
    receiver = Receiver(spool, db, keep_patient=settings.status_page.show_patient)
    server = DimseServer(settings, receiver)
    server.start()
    with TestClient(create_app(settings, db, receiver, ready=lambda: True)) as http:
        yield port, http, db, receiver, request.param
    server.stop(1)
    receiver.close()
    spool.close()
    db.close()


def c_store(port: int, datasets: list[bytes], db: Database) -> None:
    """Send `datasets` in one association and wait until the node has ended it: it logs and
    audits the end from its own thread after the modality's release returns, and a test that
    ended first would have that line printed outside its capture."""
    ended = len(audit.query(db, "instances_stored"))
    ae = AE(ae_title="CT1")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="NODAL")
    assert assoc.is_established
    for data in datasets:
        assert assoc.send_c_store(pydicom.dcmread(io.BytesIO(data))).Status == 0
    assoc.release()
    deadline = time.monotonic() + 10
    while len(audit.query(db, "instances_stored")) == ended:
        assert time.monotonic() < deadline, "the node did not end the association"
        time.sleep(0.02)


def stored(db: Database, uid: str) -> tuple:
    with db.session() as s:
        st = s.get(Study, uid)
        return st.accession_number, st.patient_name, st.patient_id


def test_dimse_and_stow_label_the_study(node):
    port, http, db, receiver, shown = node
    c_store(port, [instance("1.2.3.1.1", "1.2.3.1"), instance("1.2.3.1.2", "1.2.3.1")], db)
    r = http.post(
        "/dicom-web/studies", content=body([instance("1.2.3.2.1", "1.2.3.2", "ACC-2")]), headers=HEADERS
    )
    assert r.status_code == 200
    assert receiver.flush(10)
    patient = (NAME, PID) if shown else (None, None)
    assert stored(db, "1.2.3.1") == ("ACC-1", *patient)
    assert stored(db, "1.2.3.2") == ("ACC-2", *patient)
    page = http.get("/status/data.json").json()["studies"]["studies"]
    assert {s["accession_number"] for s in page} == {"ACC-1", "ACC-2"}
    html = http.get("/").text + http.get("/status/studies/1.2.3.1").text
    assert "ACC-1" in html and "ACC-2" in html
    assert all(("patient_name" in s) is shown and ("patient_id" in s) is shown for s in page)
    assert (NAME in html and PID in html) is shown
    api = http.get("/api/studies/1.2.3.1").json()
    assert api["accession_number"] == "ACC-1" and NAME not in str(api) and PID not in str(api)


def test_a_later_instance_without_accession_number_keeps_it_and_a_new_one_replaces_it(node):
    port, _, db, receiver, _ = node
    c_store(port, [instance("1.2.4.1", "1.2.4", "FIRST")], db)
    assert receiver.flush(10)
    c_store(port, [instance("1.2.4.2", "1.2.4", "")], db)
    assert receiver.flush(10)
    assert stored(db, "1.2.4")[0] == "FIRST"
    c_store(port, [instance("1.2.4.3", "1.2.4", "CORRECTED")], db)
    assert receiver.flush(10)
    assert stored(db, "1.2.4")[0] == "CORRECTED"


def test_labels_take_the_latest_instance_that_has_each_value():
    def pending(sop: str, accession: str, name: str) -> Pending:
        header = read_header(part10(sop=sop, AccessionNumber=accession, PatientName=name, PatientID=""))
        return Pending(header, "x", 1, Source("dimse", "t"), 0.0)

    group = [pending("1.1", "A", "Old^Name"), pending("1.2", "B", ""), pending("1.3", "", "")]
    assert study_labels(group, keep_patient=False) == {"accession_number": "B"}
    assert study_labels(group, keep_patient=True) == {"accession_number": "B", "patient_name": "Old^Name"}


def test_patient_erased_at_start_when_not_shown_and_reconcile_follows_the_setting(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'i.sqlite3'}")
    spool = Spool(tmp_path / "spool")
    receiver = Receiver(spool, db, keep_patient=True)
    receiver.store_bytes(instance("1.2.5.1", "1.2.5"), Source("stow", "t1"))
    assert receiver.flush(10)
    receiver.close()
    assert stored(db, "1.2.5") == ("ACC-1", NAME, PID)
    assert forget_patients(db) == 1 and forget_patients(db) == 0
    assert stored(db, "1.2.5") == ("ACC-1", None, None)
    # an index that lost its rows is rebuilt from the spool: with the patient only when shown
    for keep in (False, True):
        with db.session() as s:
            for table in ("instances", "series", "studies"):
                s.execute(text(f"DELETE FROM {table}"))
        assert reconcile(spool, db, keep_patient=keep) == (0, 1)
        assert stored(db, "1.2.5") == ("ACC-1", NAME if keep else None, PID if keep else None)
    with db.session() as s:
        assert s.scalars(select(Study.study_uid)).all() == ["1.2.5"]
    spool.close()
    db.close()
