"""DICOM Segmentation (BINARY) with one segment per lymph node.

Segment n (1-based) is ``study_findings.findings[n - 1]``, labelled with the finding's label
(``LN-n``) and carrying its tracking ID and UID, so that SR groups can refer to it.  The
pixel array is built in source-frame order (volume slice ``k`` goes to the source instance
or frame named by ``study_findings.slices[k]``), so highdicom copies plane positions and
per-frame source references straight from the source images.
"""

from __future__ import annotations

import colorsys

import highdicom as hd
import numpy as np

from inference.findings import Finding, StudyFindings
from sr_templates import codes, provenance
from sr_templates.sources import SourceSeries
from sr_templates.uids import ResultUIDs

#: Content Label (CS, at most 16 characters).
CONTENT_LABEL = "LYMPH_NODES_AI"


def segment_rgb(index: int) -> tuple[int, int, int]:
    """A distinct, saturated display colour for segment `index` (0-based)."""
    hue = (0.08 + index * 0.381966) % 1.0  # golden-ratio steps around the hue circle
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return round(r * 255), round(g * 255), round(b * 255)


def segment_descriptions(study_findings: StudyFindings) -> list[hd.seg.SegmentDescription]:
    """One Segment Description per finding, in findings order."""
    algorithm = provenance.seg_algorithm_identification(study_findings.model)
    out = []
    for index, finding in enumerate(study_findings.findings):
        out.append(
            hd.seg.SegmentDescription(
                segment_number=index + 1,
                segment_label=finding.label[:64],
                segmented_property_category=codes.ANATOMICAL_STRUCTURE,
                segmented_property_type=codes.LYMPH_NODE,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=finding.tracking_uid,
                tracking_id=finding.label[:64],
                display_color=hd.color.CIELabColor.from_rgb(*segment_rgb(index)),
            )
        )
    return out


def _slice_ranges(finding: Finding) -> tuple[int, int, int, int, int, int]:
    k0, j0, i0, k1, j1, i1 = (int(v) for v in finding.bbox)
    if finding.mask.shape != (k1 - k0, j1 - j0, i1 - i0):
        raise ValueError(
            f"{finding.label}: mask shape {finding.mask.shape} does not match its bbox {finding.bbox}"
        )
    return k0, j0, i0, k1, j1, i1


def _painted_slices(finding: Finding) -> list[int]:
    """Volume slices k on which the finding has at least one voxel."""
    k0, _, _, k1, _, _ = _slice_ranges(finding)
    mask = np.asarray(finding.mask, dtype=bool)
    return [k0 + dk for dk in range(k1 - k0) if mask[dk].any()]


def label_map(sources: SourceSeries, study_findings: StudyFindings) -> np.ndarray:
    """Label map ``(planes, rows, columns)`` in source-plane order, value n for segment n.

    Segments never overlap (viewers such as OHIF lose whole segments of a SEG whose
    segments share a voxel), so a voxel claimed by two findings is an error here: the
    findings are made exclusive, and measured, before they are written.
    """
    findings = study_findings.findings
    shape = (sources.number_of_planes, sources.rows, sources.columns)
    labels = np.zeros(shape, dtype=np.uint8 if len(findings) < 256 else np.uint16)
    for number, finding in enumerate(findings, start=1):
        k0, j0, i0, _, j1, i1 = _slice_ranges(finding)
        mask = np.asarray(finding.mask, dtype=bool)
        for k in _painted_slices(finding):
            m = mask[k - k0]
            plane = labels[sources.planes[k].plane_index, j0:j1, i0:i1]
            taken = plane[m]
            if np.any(taken):
                other = findings[int(taken[taken > 0][0]) - 1].label
                raise ValueError(
                    f"{finding.label} and {other} share voxels on slice {k}; segments must not "
                    "overlap (give each voxel to one finding before writing)"
                )
            plane[m] = number
    return labels


def build_seg(
    sources: SourceSeries,
    study_findings: StudyFindings,
    uids: ResultUIDs,
    *,
    omit_empty_frames: bool = True,
) -> hd.seg.Segmentation:
    """The SEG of all findings (at least one finding is required)."""
    if not study_findings.findings:
        raise ValueError("a Segmentation needs at least one finding; write only the SR")
    for finding in study_findings.findings:
        if not np.asarray(finding.mask).any():
            raise ValueError(f"{finding.label}: the mask is empty")
    model = study_findings.model
    seg = hd.seg.Segmentation(
        source_images=sources.for_highdicom,
        pixel_array=label_map(sources, study_findings),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(study_findings),
        series_instance_uid=uids.seg_series,
        series_number=provenance.SEG_SERIES_NUMBER,
        sop_instance_uid=uids.seg_instance,
        instance_number=1,
        manufacturer=codes.MANUFACTURER,
        manufacturer_model_name=codes.MODEL_NAME,
        software_versions=provenance.software_versions(model),  # type: ignore[arg-type]
        device_serial_number=str(provenance.algorithm_device_uid(model)),
        content_label=CONTENT_LABEL,
        content_creator_name=provenance.content_creator_name(model),
        content_description=f"AI lymph nodes, {provenance.model_label(model)}, unverified"[:64],
        omit_empty_frames=omit_empty_frames,
        contributing_equipment=[provenance.contributing_equipment(model)],
        series_description=provenance.SEG_SERIES_DESCRIPTION,
    )
    return seg
