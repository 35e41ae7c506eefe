"""Phantoms written in the layouts sites hold labelled CT in (see `inference.datasets`).

`export_nnunet` writes an nnU-Net v2 raw dataset (NIfTI images and labels, dataset.json);
`export_dicom_seg` writes each phantom as a DICOM CT series (nodal's phantom series writer)
with a DICOM SEG beside it (highdicom), as TCIA distributes lymph-node annotations. Both
carry the phantom's ground truth as nodal's label values: 0 background, 1 lymph node, 2
malignant lymph node (the node's training label, `NodeTruth.malignant`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from inference.datasets import MALIGNANT, NODE
from inference.phantoms import Phantom, write_phantom
from inference.uids import deterministic_uid

NNUNET_LABELS = {"background": 0, "lymph node": NODE, "malignant lymph node": MALIGNANT}


def phantom_label(ph: Phantom) -> np.ndarray:
    """The phantom's nodes as nodal's label values (uint8, the phantom's grid)."""
    lut = np.zeros(len(ph.nodes) + 1, np.uint8)
    for node in ph.nodes:
        lut[node.index] = MALIGNANT if node.malignant else NODE
    return lut[ph.labels]


def to_nifti(array: np.ndarray, affine: np.ndarray):
    """nodal's (slice, row, column) array and (k, j, i) -> LPS affine as a NIfTI image."""
    import nibabel as nib

    lps = np.eye(4)
    lps[:3, :3] = affine[:3, 2::-1]  # columns (i, j, k)
    lps[:3, 3] = affine[:3, 3]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    img = nib.Nifti1Image(np.ascontiguousarray(np.transpose(array, (2, 1, 0))), ras)
    img.set_qform(ras, code=1)
    img.set_sform(ras, code=1)
    return img


def export_nnunet(
    train: Sequence[Phantom], out_dir: Path, test: Sequence[Phantom] = (), name: str = "NodalPhantoms"
) -> Path:
    """Write `train` (imagesTr/, labelsTr/) and `test` (imagesTs/, labelsTs/) with dataset.json."""
    import nibabel as nib

    out_dir = Path(out_dir)
    for split, phantoms in (("Tr", train), ("Ts", test)):
        if not phantoms:
            continue
        (out_dir / f"images{split}").mkdir(parents=True, exist_ok=True)
        (out_dir / f"labels{split}").mkdir(parents=True, exist_ok=True)
        for ph in phantoms:
            case = f"phantom_{ph.seed:07d}"
            image = to_nifti(ph.hu.astype(np.int16), ph.affine)
            nib.save(image, out_dir / f"images{split}" / f"{case}_0000.nii.gz")
            nib.save(to_nifti(phantom_label(ph), ph.affine), out_dir / f"labels{split}" / f"{case}.nii.gz")
    meta = {
        "name": name,
        "description": "nodal synthetic CT phantoms (inference/phantoms.py)",
        "channel_names": {"0": "CT"},
        "labels": NNUNET_LABELS,
        "numTraining": len(train),
        "file_ending": ".nii.gz",
    }
    (out_dir / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def export_dicom_seg(phantoms: Sequence[Phantom], out_dir: Path, per_node: bool = True) -> list[Path]:
    """Each phantom as ``<case>/ct/`` (CT series) and ``<case>/seg.dcm``; returns the SEG files.

    `per_node`: one segment per node, labelled benign or malignant; otherwise one segment
    for all nodes (malignancy unknown).
    """
    out = []
    for ph in phantoms:
        case = Path(out_dir) / f"phantom_{ph.seed:07d}"
        paths = write_phantom(ph, case / "ct")
        seg = phantom_seg(ph, paths, per_node)
        seg.save_as(case / "seg.dcm")
        out.append(case / "seg.dcm")
    return out


def phantom_seg(ph: Phantom, ct_paths: Sequence[Path], per_node: bool = True, seg_type: str = "BINARY"):
    """A highdicom SEG of the phantom's nodes on its written CT series (in k order);
    `seg_type` BINARY, FRACTIONAL or LABELMAP."""
    import highdicom as hd
    import pydicom

    from sr_templates import codes

    sources = [pydicom.dcmread(p) for p in ct_paths]

    def description(number: int, label: str) -> hd.seg.SegmentDescription:
        return hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=codes.ANATOMICAL_STRUCTURE,
            segmented_property_type=codes.LYMPH_NODE,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )

    if per_node:
        pixels = ph.labels.copy()
        segments = [
            description(n.index, f"lymph node {n.index} {'malignant' if n.malignant else 'benign'}")
            for n in ph.nodes
        ]
    else:
        pixels = (ph.labels > 0).astype(np.uint8)
        segments = [description(1, "lymph nodes")]
    if not segments:
        raise ValueError(f"phantom {ph.seed} has no node; a SEG needs at least one segment")
    if seg_type == "FRACTIONAL":
        pixels = np.stack([(pixels == d.SegmentNumber).astype(np.float32) for d in segments], axis=-1)
    key = f"nodal-phantom-seg-{ph.seed}-{'nodes' if per_node else 'all'}-{seg_type}"
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues[seg_type],
        segment_descriptions=segments,
        series_instance_uid=deterministic_uid(key, "series"),
        series_number=100,
        sop_instance_uid=deterministic_uid(key, "instance"),
        instance_number=1,
        manufacturer=codes.MANUFACTURER,
        manufacturer_model_name=codes.MODEL_NAME,
        software_versions=codes.SOFTWARE_VERSION,
        device_serial_number="0",
        series_description="Phantom lymph nodes (ground truth)",
    )
