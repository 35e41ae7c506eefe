"""A small CT series with ellipsoid nodes and the findings that describe them, and the
validators (dciodvfy, dsrdump) the result-object tests run."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from inference.ct_series import PatientInfo, write_ct_series
from inference.dicom_volume import load_series
from inference.findings import ModelInfo, StudyFindings
from sr_templates.synthetic import ellipsoid_finding, paint, study_findings
from sr_templates.uids import uid_from_names

SHAPE = (20, 64, 64)


SPACING = (2.5, 0.8, 0.75)  # k, j, i in mm


ORIGIN = (-24.0, -25.6, -100.0)


MODEL = ModelInfo(name="nodal-ln-test", version="1.2.3")


@dataclass(frozen=True)
class NodeSpec:
    center_kji: tuple[float, float, float]
    radii_mm: tuple[float, float, float]
    probability: float
    category: str


NODES = (
    NodeSpec((10.0, 30.0, 24.0), (6.0, 5.0, 8.0), 0.82, "pathological non-target (10-15 mm)"),
    NodeSpec((6.0, 44.0, 46.0), (4.0, 3.0, 3.2), 0.21, "normal (<10 mm)"),
)


BACKGROUND_HU = -100.0


NODE_HU = 45.0


@dataclass(frozen=True)
class Case:
    datasets: list[Dataset]
    findings: StudyFindings
    folder: Path


def affine() -> np.ndarray:
    a = np.eye(4)
    a[:3, 0] = (0.0, 0.0, SPACING[0])
    a[:3, 1] = (0.0, SPACING[1], 0.0)
    a[:3, 2] = (SPACING[2], 0.0, 0.0)
    a[:3, 3] = ORIGIN
    return a


def make_case(
    folder: Path,
    *,
    nodes: Sequence[NodeSpec] = NODES,
    enhanced: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
    patient: PatientInfo | None = None,
    uid_seed: str = "nodal-sr-test",
    shape: tuple[int, int, int] = SHAPE,
    model: ModelInfo = MODEL,
) -> Case:
    """Write, read back and describe a synthetic CT series with `nodes` in it."""
    a = affine()
    array = np.full(shape, BACKGROUND_HU, dtype=np.float32)
    findings = []
    for n, spec in enumerate(nodes):
        finding = ellipsoid_finding(
            label=f"LN-{n + 1}",
            tracking_uid=uid_from_names("test-tracking", uid_seed, str(n)),
            shape=shape,
            affine=a,
            center_kji=spec.center_kji,
            radii_mm=spec.radii_mm,
            malignancy_probability=spec.probability,
            size_category=spec.category,
            mean_hu=NODE_HU,
        )
        paint(array, finding, NODE_HU)
        findings.append(finding)
    ct_folder = folder / "ct"
    paths = write_ct_series(
        array,
        a,
        ct_folder,
        patient=patient,
        uid_seed=uid_seed,
        enhanced=enhanced,
        transfer_syntax=transfer_syntax,
    )
    datasets = [pydicom.dcmread(p) for p in paths]
    volume = load_series(datasets)
    assert np.allclose(volume.affine, a), "the loader must reproduce the written geometry"
    sf = study_findings(
        study_instance_uid=volume.study_instance_uid,
        series_instance_uid=volume.series_instance_uid,
        frame_of_reference_uid=volume.frame_of_reference_uid,
        slices=volume.slices,
        shape=volume.shape,
        affine=volume.affine,
        findings=findings,
        model=model,
    )
    return Case(datasets=datasets, findings=sf, folder=folder)


DCIODVFY = shutil.which("dciodvfy")


DSRDUMP = shutil.which("dsrdump")


needs_dciodvfy = pytest.mark.skipif(
    DCIODVFY is None,
    reason="dciodvfy not installed (Debian package dicom3tools; `make test` installs it)",
)


needs_dsrdump = pytest.mark.skipif(
    DSRDUMP is None, reason="dsrdump not installed (Debian package dcmtk; `make test` installs it)"
)


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) that dciodvfy reports for `path`."""
    assert DCIODVFY is not None
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, check=False)
    lines = (run.stdout + run.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    return errors, warnings
