"""Studies for the follow-up tests: small CT series with chosen patient, date and headers,
put into a real Orthanc (issue 17)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import requests

from inference.ct_series import PatientInfo, write_ct_series
from tests.helpers.peers import Orthanc


def small_ct(
    out: Path, seed: str, patient_id: str, study_date: str, slices: int = 12, **attrs: str
) -> tuple[list[Path], str, str]:
    """A 12-slice 32x32 CT series of `patient_id` on `study_date` (attrs set on every file);
    its files, Study and Series Instance UIDs."""
    hu = np.full((slices, 32, 32), -1000.0)
    hu[:, 8:24, 8:24] = 40.0
    affine = np.array([[0, 0, 2.0, 0], [0, 2.0, 0, 0], [5.0, 0, 0, 0], [0, 0, 0, 1]])
    paths = write_ct_series(
        hu, affine, out, patient=PatientInfo(id=patient_id), uid_seed=f"nodal-test-{seed}"
    )
    restamp(paths, StudyDate=study_date, **attrs)
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    return paths, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def restamp(paths: list[Path], **attrs: str) -> None:
    """Set (or, with "", delete) header attributes in every file."""
    for p in paths:
        ds = pydicom.dcmread(p)
        for k, v in attrs.items():
            if v == "" and k in ds:
                delattr(ds, k)
            elif v != "":
                setattr(ds, k, v)
        ds.save_as(p, enforce_file_format=True)


def upload(orthanc: Orthanc, paths: list[Path]) -> None:
    for p in paths:
        r = requests.post(f"{orthanc.url}/instances", data=p.read_bytes(), timeout=30)
        r.raise_for_status()


def register_modality(orthanc: Orthanc, name: str, aet: str, port: int) -> None:
    """Make `aet` at 127.0.0.1:`port` known to Orthanc: it may then query, C-GET and be a
    C-MOVE destination (Orthanc allows all of them to a known modality by default)."""
    r = requests.put(
        f"{orthanc.url}/modalities/{name}", json={"AET": aet, "Host": "127.0.0.1", "Port": port}, timeout=10
    )
    r.raise_for_status()
