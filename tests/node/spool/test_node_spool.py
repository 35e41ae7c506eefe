"""Spool and ingest: UIDs checked before they name files, durable writes, one copy per SOP Instance UID."""

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import func, select

from dicom_node.index.db import Database, Instance, Series, Study
from dicom_node.receive.contract import CANNOT_UNDERSTAND, SUCCESS, Outcome, Source
from dicom_node.receive.receiver import Receiver
from dicom_node.receive.reconcile import reconcile
from dicom_node.spool.header import InvalidInstanceError, check_uid, read_header
from dicom_node.spool.store import Spool, relative_path
from tests.helpers.dicom import enhanced_ct, part10


@pytest.fixture(params=["log", "fsync", "syncfs"])
def receiver(tmp_path, request):
    db = Database(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    spool = Spool(tmp_path / "spool", request.param)
    r = Receiver(spool, db)
    yield r
    r.close()
    spool.close()
    db.close()


SRC = Source(via="dimse", transfer_id="a1", calling_ae="CT1", peer_host="10.0.0.5")


@pytest.mark.parametrize(
    "bad",
    ["", "../../etc/passwd", "1.2/3", "1.2.3\\4", "1." + "2" * 70, "1..2", ".1.2", "1.2.", "a.b", "1.2 3"],
)
def test_malformed_uids_are_refused(bad):
    with pytest.raises(InvalidInstanceError):
        check_uid(bad, "SOP Instance UID")


def test_good_uid_passes_trailing_padding_removed():
    assert check_uid("1.2.840.10008.1.2\0", "x") == "1.2.840.10008.1.2"


def test_header_fields(tmp_path):
    h = read_header(part10())
    assert (h.sop_instance_uid, h.study_instance_uid, h.series_instance_uid) == (
        "1.2.3.4.5",
        "1.2.3",
        "1.2.3.4",
    )
    assert h.image_type == ("ORIGINAL", "PRIMARY", "AXIAL") and h.slice_thickness_mm == 2.5
    assert h.transfer_syntax_uid == ExplicitVRLittleEndian


def test_header_of_enhanced_ct_reads_thickness_from_functional_groups():
    """The parse stops after Number of Frames, except where the thickness lives further on."""
    h = read_header(enhanced_ct([0.0, 1.0, 2.0], thickness="1.25"))
    assert (h.frames, h.slice_thickness_mm) == (3, 1.25)
    # a later tag after the stopping point is not needed for a single-frame instance
    single = part10(Rows=2, Columns=2, BitsAllocated=16, PixelData=b"\0" * 8)
    assert read_header(single).slice_thickness_mm == 2.5


def test_stored_as_received_durably_and_indexed(receiver):
    data = part10()
    r = receiver.store_bytes(data, SRC, expected_sop_uid="1.2.3.4.5")
    assert r.outcome is Outcome.STORED and r.status == SUCCESS
    assert receiver.flush()  # in log mode the file is written just after the acknowledgement
    path = receiver.spool.root / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    assert path.read_bytes() == data  # byte for byte, meta header included
    assert not list(receiver.spool.tmp.iterdir())
    with receiver.db.session() as s:
        inst = s.get(Instance, "1.2.3.4.5")
        assert inst.calling_ae == "CT1" and inst.path == "1.2.3/1.2.3.4/1.2.3.4.5.dcm"
        assert s.get(Study, "1.2.3").pending and s.get(Series, "1.2.3.4").instance_count == 1


def test_repeated_sop_instance_stored_once(receiver):
    receiver.store_bytes(part10(), SRC)
    again = receiver.store_bytes(part10(SeriesDescription="changed"), SRC)
    assert again.outcome is Outcome.DUPLICATE and again.status == SUCCESS
    receiver.flush()
    with receiver.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 1
        assert s.get(Study, "1.2.3").instance_count == 1
    stored = pydicom.dcmread(receiver.spool.root / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm")
    assert stored.SeriesDescription == "Thorax"


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("field", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
def test_path_traversal_uid_never_reaches_the_disk(receiver, tmp_path, field):
    data = part10(**{field: "../../../escaped"}) if field != "SOPInstanceUID" else part10(sop="../../x")
    r = receiver.store_bytes(data, SRC)
    assert r.outcome is Outcome.REFUSED and r.status == CANNOT_UNDERSTAND
    assert "UID" in r.reason
    assert not any(p.is_file() for p in tmp_path.rglob("*") if p.suffix == ".dcm")


def test_not_dicom_is_refused(receiver):
    r = receiver.store_bytes(b"hello" * 100, SRC)
    assert r.outcome is Outcome.REFUSED and r.status == CANNOT_UNDERSTAND


def test_command_and_dataset_uid_mismatch_is_refused(receiver):
    r = receiver.store_bytes(part10(), SRC, expected_sop_uid="1.2.3.4.6")
    assert r.outcome is Outcome.REFUSED and r.status == 0xA900


def test_disk_almost_full_refuses_with_out_of_resources(receiver):
    receiver.min_free_bytes = 1 << 62
    r = receiver.store_bytes(part10(), SRC)
    assert r.outcome is Outcome.REFUSED and r.status == 0xA700


def test_release_marks_study_released_abort_does_not(receiver):
    receiver.transfers.begin("a1")
    receiver.store_bytes(part10(), SRC)
    receiver.transfers.begin("a2")
    receiver.store_bytes(part10(sop="1.2.3.4.6"), Source(via="dimse", transfer_id="a2"))
    receiver.release("a1", released=True)  # a2 still brings the study
    assert receiver.flush()
    with receiver.db.session() as s:
        assert s.get(Study, "1.2.3").released_at is None
    receiver.release("a2", released=True)
    with receiver.db.session() as s:
        assert s.get(Study, "1.2.3").released_at is not None
    receiver.transfers.begin("a3")
    receiver.store_bytes(part10(sop="1.2.9.1", study="1.2.9", series="1.2.9.1.1"), Source("dimse", "a3"))
    receiver.release("a3", released=False)
    receiver.flush()
    with receiver.db.session() as s:
        assert s.get(Study, "1.2.9").released_at is None


def test_reconcile_indexes_lost_files_and_drops_temporaries(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    spool = Spool(tmp_path / "spool")
    rel = Path("1.2.3") / "1.2.3.4" / "1.2.3.4.5.dcm"
    (spool.root / rel).parent.mkdir(parents=True)
    (spool.root / rel).write_bytes(part10())  # on disk, index lost (power cut)
    (spool.tmp / "half.part").write_bytes(b"partial")  # never acknowledged
    assert reconcile(spool, db) == (1, 1)
    assert pydicom.dcmread(spool.root / rel).file_meta.get("SourceApplicationEntityTitle") is None
    with db.session() as s:
        assert s.get(Instance, "1.2.3.4.5").via == "recovered"
        assert s.get(Study, "1.2.3").pending
    assert reconcile(spool, db) == (0, 0)


def test_same_sop_instance_under_another_series_is_stored_once(receiver):
    receiver.store_bytes(part10(), SRC)
    receiver.store_bytes(part10(series="1.2.3.9"), SRC)  # acknowledged; the index keeps the first
    receiver.flush()
    assert not (receiver.spool.root / "1.2.3" / "1.2.3.9" / "1.2.3.4.5.dcm").exists()
    assert (receiver.spool.root / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm").exists()
    with receiver.db.session() as s:
        assert s.get(Instance, "1.2.3.4.5").series_uid == "1.2.3.4"


def test_study_folder_removed_by_retention_is_made_again(receiver):
    import shutil

    assert receiver.store_bytes(part10(), SRC).status == 0
    assert receiver.flush()
    shutil.rmtree(receiver.spool.root / "1.2.3")
    r = receiver.store_bytes(part10(sop="1.2.3.4.6"), SRC)
    assert r.status == 0 and receiver.flush()
    assert (receiver.spool.root / relative_path(r.header)).is_file()
