"""Comprehensive 3D SR, TID 1500 Measurement Report, of the lymph-node findings.

Per finding (all groups carry the finding's tracking identifier and UID, which are also the
tracking ID/UID of its SEG segment):

* one TID 1411 volumetric group that references the SEG segment, with finding = lymph node,
  long axis, short axis, volume, mean attenuation, probability of cancer (all with TID 4019
  algorithm identification), a malignant/benign evaluation and the size category;
* two TID 1410 planar groups on the key slice, one per axis line: an open two-point SCOORD
  POLYLINE and the length it depicts.  TID 1410 allows exactly one Image Region per group,
  and TID 1419 measurements inside ROI groups may not carry their own SCOORD ("INFERRED
  FROM" coordinates are only allowed in TID 1501 groups), so one planar group per line is
  the conformant way to give each line its measurement; 2D viewers draw both lines.

A study without findings gets a TID 1501 group "finding: lymph node; presence: absent".
The document is UNVERIFIED (and PRELIMINARY); COMPLETE unless the analysis was partial.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from inference.findings import AxisLine, Finding, StudyFindings
from sr_templates import codes, provenance, uids
from sr_templates.sources import SourceSeries
from sr_templates.uids import ResultUIDs

NO_FINDINGS_IDENTIFIER = "No lymph nodes found"


def _measurement(
    name: Code,
    value: float,
    unit: Code,
    algorithm: hd.sr.AlgorithmIdentification,
    *,
    derivation: Code | None = None,
) -> hd.sr.Measurement:
    if not np.isfinite(value):
        raise ValueError(f"measurement {name.meaning} is not finite: {value}")
    return hd.sr.Measurement(
        name=name,
        value=round(float(value), 6),
        unit=unit,
        algorithm_id=algorithm,
        derivation=derivation,
    )


def _tracking(finding: Finding) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=finding.tracking_uid, identifier=finding.label[:64])


def malignancy_value(probability: float) -> Code:
    """Malignant at or above :data:`codes.MALIGNANCY_THRESHOLD`, benign below it."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"malignancy probability must be in [0, 1], got {probability}")
    return codes.MALIGNANT if probability >= codes.MALIGNANCY_THRESHOLD else codes.BENIGN


def _source_image_for_region(sources: SourceSeries, k: int) -> hd.sr.SourceImageForRegion:
    ds = sources.dataset_of_slice(k)
    frame = sources.planes[k].frame_number
    return hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=ds.SOPClassUID,
        referenced_sop_instance_uid=ds.SOPInstanceUID,
        referenced_frame_numbers=None if frame is None else [frame],
    )


def _line_region(sources: SourceSeries, k: int, line: AxisLine) -> hd.sr.ImageRegion:
    points = np.asarray(line.endpoints_pixel, dtype=np.float32).reshape(2, 2)
    limits = np.array([sources.columns, sources.rows], dtype=np.float32)
    if np.any(points < 0) or np.any(points > limits):
        raise ValueError(
            f"axis line {points.tolist()} lies outside the {sources.columns}x{sources.rows} "
            "key slice; expected (column, row) pixel coordinates"
        )
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=points,
        source_image=_source_image_for_region(sources, k),
    )


def _referenced_segment(
    sources: SourceSeries, finding: Finding, seg: Dataset, segment_number: int
) -> hd.sr.ReferencedSegment:
    """Reference to segment `segment_number` with the source images it was derived from.

    Built from the findings rather than with ``ReferencedSegment.from_segmentation``, which
    keeps only the first frame of a multi-frame source.
    """
    k0, _, _, k1, _, _ = finding.bbox
    present = [k0 + dk for dk in range(k1 - k0) if finding.mask[dk].any()]
    frames_by_instance: dict[str, list[int]] = {}
    classes: dict[str, str] = {}
    for k in present:
        ds = sources.dataset_of_slice(k)
        uid = str(ds.SOPInstanceUID)
        classes[uid] = str(ds.SOPClassUID)
        frames = frames_by_instance.setdefault(uid, [])
        frame = sources.planes[k].frame_number
        if frame is not None:
            frames.append(frame)
    source_images = [
        hd.sr.SourceImageForSegmentation(
            referenced_sop_class_uid=classes[uid],
            referenced_sop_instance_uid=uid,
            referenced_frame_numbers=sorted(set(frames)) or None,
        )
        for uid, frames in frames_by_instance.items()
    ]
    return hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=segment_number,
        source_images=source_images,
    )


def finding_groups(
    sources: SourceSeries,
    finding: Finding,
    seg: Dataset,
    segment_number: int,
    algorithm: hd.sr.AlgorithmIdentification,
) -> list[
    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
]:
    """The TID 1411 group and the two TID 1410 groups of one finding."""
    axes = ((finding.long_axis, codes.LONG_AXIS), (finding.short_axis, codes.SHORT_AXIS))
    measurements = [
        *(_measurement(code, line.length_mm, codes.UCUM_MM, algorithm) for line, code in axes),
        _measurement(codes.VOLUME, finding.volume_mm3, codes.UCUM_MM3, algorithm),
        _measurement(
            codes.ATTENUATION_COEFFICIENT,
            finding.mean_hu,
            codes.UCUM_HU,
            algorithm,
            derivation=codes.MEAN,
        ),
        _measurement(
            codes.PROBABILITY_OF_CANCER,
            finding.malignancy_probability,
            codes.UCUM_NO_UNITS,
            algorithm,
        ),
    ]
    evaluations = [
        hd.sr.QualitativeEvaluation(
            codes.MALIGNANCY_INTERPRETATION, malignancy_value(finding.malignancy_probability)
        ),
        hd.sr.QualitativeEvaluation(codes.SIZE_CATEGORY, codes.size_category_code(finding.size_category)),
    ]
    volumetric = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(finding),
        referenced_segment=_referenced_segment(sources, finding, seg, segment_number),
        finding_type=codes.LYMPH_NODE,
        finding_category=codes.ANATOMICAL_STRUCTURE,
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )
    k = int(finding.key_slice)
    planar = [
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(finding),
            referenced_region=_line_region(sources, k, line),
            finding_type=codes.LYMPH_NODE,
            finding_category=codes.ANATOMICAL_STRUCTURE,
            algorithm_id=algorithm,
            measurements=[_measurement(code, line.length_mm, codes.UCUM_MM, algorithm)],
        )
        for line, code in axes
    ]
    return [volumetric, *planar]


def no_findings_group(
    result_uids: ResultUIDs, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group stating that no lymph node was found."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=result_uids(uids.NO_FINDINGS_TRACKING), identifier=NO_FINDINGS_IDENTIFIER
        ),
        finding_type=codes.LYMPH_NODE,
        algorithm_id=algorithm,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(codes.PRESENCE_OF_PROPERTY, codes.ABSENT)],
    )


def _referenced_instances(items: Sequence[Dataset]) -> set[str]:
    """SOP Instance UIDs referenced by IMAGE and COMPOSITE items anywhere in `items`."""
    found: set[str] = set()
    stack = list(items)
    while stack:
        item = stack.pop()
        if item.get("ValueType") in ("IMAGE", "COMPOSITE"):
            found.update(str(r.ReferencedSOPInstanceUID) for r in item.ReferencedSOPSequence)
        stack.extend(item.get("ContentSequence", []))
    return found


def _check_references(sr: Dataset, evidence: Sequence[Dataset]) -> None:
    """Every instance the content refers to must be listed as evidence."""
    missing = _referenced_instances(sr.ContentSequence) - {str(ds.SOPInstanceUID) for ds in evidence}
    if missing:
        raise ValueError(f"SR content refers to {len(missing)} instance(s) not in the evidence")


def observation_context(study_findings: StudyFindings) -> hd.sr.ObservationContext:
    """Device observer context (TID 1004) identifying the algorithm."""
    model = study_findings.model
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DEVICE,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=provenance.algorithm_device_uid(model),
                name=provenance.model_label(model),
                manufacturer_name=codes.MANUFACTURER,
                model_name=codes.MODEL_NAME,
            ),
        )
    )


def measurement_report(
    sources: SourceSeries,
    study_findings: StudyFindings,
    seg: Dataset | None,
    result_uids: ResultUIDs,
) -> hd.sr.MeasurementReport:
    """The TID 1500 content tree; `seg` is required when there are findings."""
    findings: Sequence[Finding] = study_findings.findings
    algorithm = provenance.sr_algorithm_identification(study_findings.model)
    if findings:
        if seg is None:
            raise ValueError("findings need their SEG: build it first and pass it as `seg`")
        n_segments = len(seg.SegmentSequence)
        if n_segments != len(findings):
            raise ValueError(f"SEG has {n_segments} segments for {len(findings)} findings")
        groups: list = []
        for number, finding in enumerate(findings, start=1):
            groups.extend(finding_groups(sources, finding, seg, number, algorithm))
    else:
        groups = [no_findings_group(result_uids, algorithm)]
    return _report(study_findings, groups)


def _report(study_findings: StudyFindings, groups: Sequence) -> hd.sr.MeasurementReport:
    return hd.sr.MeasurementReport(
        observation_context=observation_context(study_findings),
        procedure_reported=codes.CT_UNSPECIFIED_BODY_REGION,
        imaging_measurements=list(groups),
        title=codes.IMAGING_MEASUREMENT_REPORT,
    )


def document_arguments(
    sources: SourceSeries,
    study_findings: StudyFindings,
    seg: Dataset | None,
    result_uids: ResultUIDs,
    *,
    partial: bool = False,
) -> dict:
    """Keyword arguments of `Comprehensive3DSR` other than `content`."""
    model = study_findings.model
    evidence = list(sources.for_highdicom)
    if seg is not None:
        evidence.append(seg)
    uses_private = any(
        codes.uses_private_scheme(codes.size_category_code(f.size_category)) for f in study_findings.findings
    )
    return {
        "evidence": evidence,
        "series_instance_uid": result_uids.sr_series,
        "series_number": provenance.SR_SERIES_NUMBER,
        "sop_instance_uid": result_uids.sr_instance,
        "instance_number": 1,
        "manufacturer": codes.MANUFACTURER,
        "is_complete": not partial,
        "is_final": False,
        "is_verified": False,
        "contributing_equipment": [provenance.contributing_equipment(model)],
        "series_description": provenance.SR_SERIES_DESCRIPTION,
        "manufacturer_model_name": codes.MODEL_NAME,
        "software_versions": provenance.software_versions(model),
        "device_serial_number": str(provenance.algorithm_device_uid(model)),
        "coding_schemes": [codes.private_coding_scheme()] if uses_private else None,
    }


def build_sr(
    sources: SourceSeries,
    study_findings: StudyFindings,
    seg: Dataset | None,
    result_uids: ResultUIDs,
    *,
    partial: bool = False,
) -> hd.sr.Comprehensive3DSR:
    """The Comprehensive 3D SR document; `seg` is required when there are findings.

    highdicom's SR constructor deep-copies, re-parses and searches the whole content tree,
    which takes about a second for 20 nodes.  The document is therefore made around a
    one-group report with the same root (title, template, observation context) and the real
    content tree is put in afterwards; the evidence check that the constructor would have
    made is done by `_check_references`.  The result equals highdicom's own (tested).
    """
    report = measurement_report(sources, study_findings, seg, result_uids)
    arguments = document_arguments(sources, study_findings, seg, result_uids, partial=partial)
    algorithm = provenance.sr_algorithm_identification(study_findings.model)
    skeleton = _report(study_findings, [no_findings_group(result_uids, algorithm)])
    sr = hd.sr.Comprehensive3DSR(content=skeleton, **arguments)
    root = report[0]
    for keyword in ("ConceptNameCodeSequence", "ContentTemplateSequence", "ValueType"):
        if sr.get(keyword) != root.get(keyword):
            raise RuntimeError(f"SR skeleton differs from the report in {keyword}")
    sr.ContentSequence = root.ContentSequence
    sr._content = report  # what `sr.content` returns (highdicom keeps the tree here)
    _check_references(sr, arguments["evidence"])
    if partial:
        sr.CompletionFlagDescription = "Analysis did not cover the whole series"
    return sr
