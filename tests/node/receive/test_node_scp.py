"""DIMSE receiver in process (pynetdicom SCU as the peer): echo, durable store, caller checks."""

import io
import logging

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_node.config import Settings
from dicom_node.index.db import Database, Instance, Study
from dicom_node.receive.receiver import Receiver
from dicom_node.receive.scp import DimseServer
from dicom_node.spool.store import Spool
from tests.helpers.dicom import part10
from tests.helpers.peers import free_port, wait_until


@pytest.fixture
def scp(tmp_path):
    port = free_port()
    settings = Settings.model_validate(
        {
            "node": {"dimse_port": port, "bind_address": "127.0.0.1"},
            "allowed_callers": [{"ae_title": "CT1"}, {"ae_title": "PACS", "host": "192.0.2.1"}],
        }
    )
    db = Database(f"sqlite:///{tmp_path / 'i.sqlite3'}")
    spool = Spool(tmp_path / "spool")
    receiver = Receiver(spool, db)
    server = DimseServer(settings, receiver)
    server.start()
    yield port, receiver, server
    server.stop(1)
    receiver.close()
    spool.close()
    db.close()


def associate(port, calling="CT1"):
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    return ae.associate("127.0.0.1", port, ae_title="NODAL")


def test_echo_and_store(scp):
    port, receiver, _ = scp
    assoc = associate(port)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    ds = pydicom.dcmread(io.BytesIO(part10()))
    assert assoc.send_c_store(ds).Status == 0
    assert assoc.send_c_store(ds).Status == 0  # a repeat is acknowledged, stored once
    assoc.release()
    stored = receiver.spool.root / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    receiver.flush()
    back = pydicom.dcmread(stored)
    assert back.SOPInstanceUID == "1.2.3.4.5" and back.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4.5"
    # the server's EVT_RELEASED handler runs after it answered the release: wait for it
    wait_until(lambda: _released(receiver, "1.2.3"), 5, "the release to be recorded", every=0.05)
    with receiver.db.session() as s:
        study = s.get(Study, "1.2.3")
        assert study.instance_count == 1 and study.released_at is not None
        assert s.get(Instance, "1.2.3.4.5").calling_ae == "CT1"
    assert back.file_meta.SourceApplicationEntityTitle == "CT1"  # so reconcile can recover the caller


def _released(receiver, study_uid: str) -> bool:
    with receiver.db.session() as s:
        return s.get(Study, study_uid).released_at is not None


def test_unknown_calling_ae_is_rejected_and_logged(scp, caplog):
    port, _, server = scp
    with caplog.at_level(logging.WARNING, logger="nodal.scp"):
        assoc = associate(port, calling="INTRUDER")
    assert assoc.is_rejected
    assert "'INTRUDER' is not in allowed_callers" in caplog.text
    assert server.rejected == 1


def test_known_ae_from_the_wrong_host_is_rejected(scp, caplog):
    port, _, _ = scp
    with caplog.at_level(logging.WARNING, logger="nodal.scp"):
        assoc = associate(port, calling="PACS")
    assert assoc.is_rejected
    assert "not from host 127.0.0.1" in caplog.text


def test_uid_that_would_escape_the_spool_gets_a_failure_status(scp, tmp_path):
    port, _, _ = scp
    assoc = associate(port)
    ds = pydicom.dcmread(io.BytesIO(part10()))
    ds.StudyInstanceUID = "../../../tmp"
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0xC000
    assert not [p for p in tmp_path.rglob("*.dcm")]
