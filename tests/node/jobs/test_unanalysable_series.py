"""Series nodal cannot analyse, received through the real ingest path and run by the real job
function: each job ends skipped (out of scope) or failed (broken input) with the reason in
the REST API, and nothing is retried that retrying cannot fix."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.encaps import encapsulate

from dicom_node.api.app import create_app
from dicom_node.completion.quiet import complete_due_studies
from dicom_node.config import Settings
from dicom_node.index.db import Database
from dicom_node.jobs.embedded import run_one
from dicom_node.jobs.table import claim
from dicom_node.receive.contract import Source
from dicom_node.receive.receiver import Receiver
from dicom_node.spool.store import Spool
from inference import phantoms

SPEC = phantoms.PhantomSpec(
    rows=32, columns=32, pixel_spacing_mm=8.0, slices=16, slice_spacing_mm=5.0, nodes=(0, 0)
)
MPEG2 = "1.2.840.10008.1.2.4.100"


def _mixed_orientation(paths: list[Path]) -> None:
    ds = pydicom.dcmread(paths[3])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9962, 0.0872]  # 5 degrees off its neighbours
    ds.save_as(paths[3])


def _drop_pixels(paths: list[Path]) -> None:
    ds = pydicom.dcmread(paths[7])
    del ds.PixelData
    ds.save_as(paths[7])


def _damage_pixels(paths: list[Path]) -> None:
    ds = pydicom.dcmread(paths[5])
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(paths[5])


def _unsupported_syntax(paths: list[Path]) -> None:
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.file_meta.TransferSyntaxUID = MPEG2  # an encapsulated stream nodal cannot decode
        ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
        ds["PixelData"].VR = "OB"
        ds.save_as(p, enforce_file_format=True)


def _modality_mr(paths: list[Path]) -> None:
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.Modality = "MR"
        ds.save_as(p)


CASES = {
    # name: (damage, keep only the first n files, state, words in the reason)
    "missing slice": (lambda p: p.pop(8).unlink(), None, "failed", ["MissingSlicesError", "gap"]),
    "mixed orientations": (_mixed_orientation, None, "skipped", ["MixedOrientationError"]),
    "pixel data missing": (_drop_pixels, None, "failed", ["PixelDataError", "no pixel data"]),
    "pixel data undecodable": (_damage_pixels, None, "failed", ["PixelDataError"]),
    "unsupported transfer syntax": (
        _unsupported_syntax,
        None,
        "failed",
        ["UnsupportedTransferSyntax", MPEG2],
    ),
    "wrong modality": (_modality_mr, None, "skipped", ["modality MR is not CT"]),
    "too few slices": (None, 6, "skipped", ["6 slices, fewer than 10"]),
}


@pytest.fixture
def node(tmp_path):
    settings = Settings.model_validate(
        {
            "node": {"data_dir": str(tmp_path)},
            "routing": {"rules": [{"name": "ct", "min_slices": 10, "max_slice_thickness_mm": 10}]},
            "jobs": {"max_attempts": 3},
            "volume": {"min_slices": 4},
        }
    )
    db = Database(f"sqlite:///{tmp_path / 'i.sqlite3'}")
    spool = Spool(tmp_path / "spool")
    receiver = Receiver(spool, db)
    with TestClient(create_app(settings, db, receiver, ready=lambda: True)) as client:
        yield settings, db, receiver, client
    receiver.close()
    spool.close()
    db.close()


def test_each_unanalysable_series_ends_with_its_reason_in_the_api(node, tmp_path):
    settings, db, receiver, client = node
    studies = {}
    for i, (name, (damage, keep, _, _)) in enumerate(CASES.items()):
        paths = phantoms.write_phantom(phantoms.generate(5_300_000 + i, SPEC), tmp_path / f"case-{i}")
        paths = sorted(p for p in paths if p.is_file() and _is_dicom(p))[: keep or None]
        if damage:
            damage(paths)
        for p in paths:
            r = receiver.store_bytes(p.read_bytes(), Source("dimse", f"t{i}", "CT1"))
            assert r.status == 0, (name, r.reason)
        studies[name] = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    receiver.flush()
    complete_due_studies(db, settings, set(), time.time() + 3600)
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    while (job := claim(db, "test-worker", 60, time.time() + 3600)) is not None:
        run_one(db, settings, job.id, job.series_uid, "test-worker", receiver.spool.root, outbox, model=None)
    seen = {}
    for name, (_, _, state, words) in CASES.items():
        [job] = client.get(f"/api/jobs?study={studies[name]}").json()["jobs"]
        detail = client.get(f"/api/jobs/{job['id']}").json()
        seen[name] = (detail["state"], detail["reason"])
        assert detail["state"] == state, (name, detail)
        assert all(w in (detail["reason"] or "") for w in words), (name, detail["reason"])
        assert detail["attempts"] <= 1, (name, "retried although retrying cannot help")
        assert not list(outbox.glob(f"job-{job['id']}*"))
    print("\n" + "\n".join(f"{k}: {v[0]}: {v[1]}" for k, v in seen.items()))


def _is_dicom(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(132)[128:] == b"DICM"
