"""Comprehensive 3D SR, TID 1500 Measurement Report, of the lymph-node findings.

Per finding, two measurement groups that carry the finding's tracking identifier and UID
(also the tracking ID/UID of its SEG segment), so that a viewer merging groups by tracking
UID (OHIF does) shows one node with all of its values:

* a TID 1501 group with the long and short axis, each NUM INFERRED FROM its line (an open
  two-point SCOORD POLYLINE on the key slice, SELECTED FROM that image; TID 300 allows
  coordinates inside a measurement only in TID 1501 groups), and a Comment (TEXT) that says
  the node's call and size class in words;
* a TID 1411 volumetric group that references the SEG segment, with the volume, the mean
  attenuation, the probability of cancer (in percent), a malignant/benign evaluation and the
  size category.

Neither group has a group-level SCOORD: OHIF draws only the first group-level SCOORD of a
node, but every NUM's own line.  Algorithm identification (TID 4019) sits on the groups, not
on the NUMs, because OHIF drops a NUM (label included) whose children hold no SCOORD.

A study without findings gets a TID 1501 group "finding: lymph node; presence: absent".
The document is UNVERIFIED (and PRELIMINARY); COMPLETE unless the analysis was partial.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from inference import rules
from inference.findings import AxisLine, Finding, StudyFindings
from inference.followup import Comparison
from sr_templates import codes, followup, provenance, uids
from sr_templates.sources import SourceSeries
from sr_templates.uids import ResultUIDs

NO_FINDINGS_IDENTIFIER = "No lymph nodes found"
#: Tracking Identifier of the axes group when the measurements are to be editable in OHIF:
#: the name of the Cornerstone tool whose SR form the group already has (docs/results.md).
OHIF_BIDIRECTIONAL = "Cornerstone3DTools@^0.1.0:Bidirectional"


def _measurement(
    name: Code,
    value: float,
    unit: Code,
    *,
    derivation: Code | None = None,
    line: hd.sr.CoordinatesForMeasurement | None = None,
) -> hd.sr.Measurement:
    if not np.isfinite(value):
        raise ValueError(f"measurement {name.meaning} is not finite: {value}")
    return hd.sr.Measurement(
        name=name,
        value=round(float(value), 6),
        unit=unit,
        derivation=derivation,
        referenced_coordinates=None if line is None else [line],
    )


def _tracking(finding: Finding, identifier: str | None = None) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=finding.tracking_uid, identifier=(identifier or finding.label)[:64])


def malignancy_value(probability: float) -> Code:
    """Malignant at or above :data:`codes.MALIGNANCY_THRESHOLD`, benign below it."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"malignancy probability must be in [0, 1], got {probability}")
    return codes.MALIGNANT if probability >= codes.MALIGNANCY_THRESHOLD else codes.BENIGN


def _axis_line(sources: SourceSeries, k: int, line: AxisLine) -> hd.sr.CoordinatesForMeasurement:
    """The line a diameter was measured on: SCOORD POLYLINE on key slice `k`."""
    points = np.asarray(line.endpoints_pixel, dtype=np.float32).reshape(2, 2)
    limits = np.array([sources.columns, sources.rows], dtype=np.float32)
    if np.any(points < 0) or np.any(points > limits):
        raise ValueError(
            f"axis line {points.tolist()} lies outside the {sources.columns}x{sources.rows} "
            "key slice; expected (column, row) pixel coordinates"
        )
    ds = sources.dataset_of_slice(k)
    frame = sources.planes[k].frame_number
    return hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=points,
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=ds.SOPClassUID,
            referenced_sop_instance_uid=ds.SOPInstanceUID,
            referenced_frame_numbers=None if frame is None else [frame],
        ),
    )


def comment(finding: Finding) -> str:
    """The node's call and size class in words (ASCII), e.g. ``"LN-1 malignant, size:
    pathological target (>=15 mm)"``."""
    call = malignancy_value(finding.malignancy_probability).meaning.lower()
    edge = f"; {rules.SCAN_EDGE_REMARK}" if rules.FLAG_SCAN_EDGE in finding.flags else ""
    return f"{finding.label} {call}, size: {finding.size_category}{edge}"


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
    *,
    editable_in_ohif: bool = False,
    extras: followup.NodeExtras | None = None,
) -> list[
    hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
]:
    """The TID 1501 group (axes with their lines) and the TID 1411 group of one finding.

    `editable_in_ohif`: the axes group's tracking identifier names OHIF's bidirectional
    tool (:data:`OHIF_BIDIRECTIONAL`), so that OHIF offers the axes as editable measurements;
    the tracking UID and the TID 1411 group's identifier (the node's label) are unchanged.
    `extras`: in a follow-up, the time point, changes and role of the node (sr_templates.followup).
    """
    k = int(finding.key_slice)
    time_point = None if extras is None else extras.time_point
    axes = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(finding, OHIF_BIDIRECTIONAL if editable_in_ohif else None),
        time_point_context=None if extras is None else extras.axes_time_point,
        finding_type=codes.LYMPH_NODE,
        finding_category=codes.ANATOMICAL_STRUCTURE,
        algorithm_id=algorithm,
        measurements=[
            _measurement(code, line.length_mm, codes.UCUM_MM, line=_axis_line(sources, k, line))
            for line, code in ((finding.long_axis, codes.LONG_AXIS), (finding.short_axis, codes.SHORT_AXIS))
        ],
    )
    axes[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.COMMENT,
            value=comment(finding) + ("" if extras is None else extras.comment_suffix),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    volumetric = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(finding),
        time_point_context=time_point,
        referenced_segment=_referenced_segment(sources, finding, seg, segment_number),
        finding_type=codes.LYMPH_NODE,
        finding_category=codes.ANATOMICAL_STRUCTURE,
        algorithm_id=algorithm,
        measurements=[
            _measurement(codes.VOLUME, finding.volume_mm3, codes.UCUM_MM3),
            _measurement(
                codes.PROBABILITY_OF_CANCER, 100.0 * finding.malignancy_probability, codes.UCUM_PERCENT
            ),
            _measurement(
                codes.ATTENUATION_COEFFICIENT, finding.mean_hu, codes.UCUM_HU, derivation=codes.MEAN
            ),
            *(() if extras is None else extras.measurements),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                codes.MALIGNANCY_INTERPRETATION, malignancy_value(finding.malignancy_probability)
            ),
            hd.sr.QualitativeEvaluation(codes.SIZE_CATEGORY, codes.size_category_code(finding.size_category)),
            *(() if extras is None else extras.evaluations),
        ],
    )
    return [axes, volumetric]


def no_findings_group(
    result_uids: ResultUIDs, algorithm: hd.sr.AlgorithmIdentification, remarks: Sequence[str] = ()
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group stating that no lymph node was found; with `remarks` (the study's,
    `StudyFindings.remarks`: slices too far apart or too thick for small nodes) a Comment
    that says them (the report says them too, `measurement_report`)."""
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=result_uids(uids.NO_FINDINGS_TRACKING), identifier=NO_FINDINGS_IDENTIFIER
        ),
        finding_type=codes.LYMPH_NODE,
        algorithm_id=algorithm,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(codes.PRESENCE_OF_PROPERTY, codes.ABSENT)],
    )
    followup.add_comment(group, "; ".join(remarks))
    return group


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
            observer_type=codes.DEVICE,  # type: ignore[arg-type]
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
    *,
    editable_in_ohif: bool = False,
    comparison: Comparison | None = None,
    current_date: str = "",
) -> hd.sr.MeasurementReport:
    """The TID 1500 content tree; `seg` is required when there are findings.

    With a `comparison` (a follow-up; `study_findings` carrying the prior's tracking UIDs,
    see `Comparison.with_prior_tracking`), the groups carry their time point and the report
    the prior values, changes and response (`sr_templates.followup`); `current_date` is the
    current study's date (DICOM DA).
    """
    findings: Sequence[Finding] = study_findings.findings
    algorithm = provenance.sr_algorithm_identification(study_findings.model)
    extra = None if comparison is None else followup.content(comparison, current_date, algorithm)
    if findings:
        if seg is None:
            raise ValueError("findings need their SEG: build it first and pass it as `seg`")
        n_segments = len(seg.SegmentSequence)
        if n_segments != len(findings):
            raise ValueError(f"SEG has {n_segments} segments for {len(findings)} findings")
        groups: list = []
        for number, finding in enumerate(findings, start=1):
            groups.extend(
                finding_groups(
                    sources,
                    finding,
                    seg,
                    number,
                    algorithm,
                    editable_in_ohif=editable_in_ohif,
                    extras=None if extra is None else extra.per_label.get(finding.label),
                )
            )
    else:
        groups = [no_findings_group(result_uids, algorithm, study_findings.remarks)]
    if extra is not None:
        groups.extend(extra.groups)
        for group in groups:
            followup.time_point_last(group)
    report = _report(study_findings, groups)
    evaluations = None if extra is None else extra.evaluations
    if study_findings.remarks:  # what the study's findings stand on (thick slices), for every reader
        if evaluations is None:
            evaluations = followup.evaluations_container([])
        which = "" if comparison is None else "current CT: "  # beside the prior CT's, in a follow-up
        followup.add_comment([evaluations], which + "; ".join(study_findings.remarks))
    if evaluations is not None:
        report[0].ContentSequence.append(evaluations)  # TID 1500 row 12, after row 6
    return report


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
    editable_in_ohif: bool = False,
    comparison: Comparison | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The Comprehensive 3D SR document; `seg` is required when there are findings.

    highdicom's SR constructor deep-copies, re-parses and searches the whole content tree,
    which takes about a second for 20 nodes.  The document is therefore made around a
    one-group report with the same root (title, template, observation context) and the real
    content tree is put in afterwards; the evidence check that the constructor would have
    made is done by `_check_references`.  The result equals highdicom's own (tested).
    """
    report = measurement_report(
        sources,
        study_findings,
        seg,
        result_uids,
        editable_in_ohif=editable_in_ohif,
        comparison=comparison,
        current_date=str(sources.dataset_of_slice(0).get("StudyDate", "") or ""),
    )
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
