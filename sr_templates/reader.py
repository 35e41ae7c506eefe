"""Reading nodal's own results back: the nodes of a prior study from its SR (and SEG).

A follow-up study is compared with the prior one (`inference.followup`). When the PACS
already holds nodal's SR for the prior, its nodes are read from it instead of analysing the
prior again, and their tracking UIDs carry over.

The SR gives each node's label, tracking UID, short and long axis, volume and malignancy
probability. Where a node lies (its centroid in patient coordinates) needs geometry the SR
does not hold: it is taken from the prior's SEG (the centroid of the node's segment, as
nodal measured it), else from the images the axis lines were drawn on (the midpoint of the
long axis on the key slice).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from pydicom.dataset import Dataset

from inference.followup.types import FROM_SR, FollowUpError, PriorNode, PriorStudy
from inference.volume import Volume
from sr_templates import codes
from sr_templates.followup import PRIOR_NAME, PRIOR_ORDER

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
_TRACKING_ID = "112039"
_TRACKING_UID = "112040"
_MEASUREMENT_GROUP = "125007"
_TIME_POINT_ORDER = "126073"
_TIME_POINT = "C2348792"
_REFERENCED_SEGMENT = "121191"
_DERIVATION = "121401"


def is_nodal_sr(ds: Dataset) -> bool:
    """Whether `ds` is a TID 1500 SR that nodal wrote (its manufacturer, model name and template)."""
    template = ds.get("ContentTemplateSequence")
    return (
        ds.get("SOPClassUID") == COMPREHENSIVE_3D_SR
        and ds.get("Manufacturer") == codes.MANUFACTURER
        and ds.get("ManufacturerModelName") == codes.MODEL_NAME
        and bool(template)
        and str(template[0].get("TemplateIdentifier")) == "1500"
    )


def read_prior_nodes(
    sr: Dataset, seg: Dataset | None = None, *, images: Sequence[Dataset] = (), volume: Volume | None = None
) -> tuple[PriorNode, ...]:
    """The nodes of nodal's SR `sr`, as measured in that (prior) study.

    `seg` (nodal's SEG of the same series) places each node at its segment's centroid;
    without it, `images` (the CT images the SR references) place it at the midpoint of its
    long-axis line. With the SEG and `volume` (the prior CT), a node whose segment reaches
    the edge of that CT is marked `at_scan_edge` (`rules.FLAG_SCAN_EDGE`); without them no
    node is. Groups of an earlier time point in a follow-up SR are skipped: only the
    study's own measurements are read. A node given by numbers alone (no segment, no line:
    a prior node the model did not find, measured at its place by `inference.followup.look`)
    was no finding of that study and is not read.

    Raises `FollowUpError` when `sr` is not nodal's SR, or a node cannot be placed.
    """
    if not is_nodal_sr(sr):
        raise FollowUpError(
            "not an SR written by nodal (Manufacturer, Manufacturer's Model Name and TID 1500 "
            f"are checked): SOP class {sr.get('SOPClassUID')}, manufacturer {sr.get('Manufacturer')!r}"
        )
    if seg is not None and seg.get("SOPClassUID") != SEGMENTATION_STORAGE:
        raise FollowUpError(f"`seg` is not a Segmentation (SOP class {seg.get('SOPClassUID')})")
    nodes: dict[str, dict] = {}
    for group in _groups(sr):
        uid = _first(group, _TRACKING_UID, "UID")
        if uid is None or _of_the_prior(group):
            continue
        node = nodes.setdefault(uid, {"uid": uid})
        label = _first(group, _TRACKING_ID, "TextValue")
        if label and not label.startswith("Cornerstone"):  # the OHIF tool name is not a label
            node["label"] = label
        for item in group.get("ContentSequence", []):
            code = _code(item)
            if item.get("ValueType") == "NUM" and not _derived(item):
                value, unit = _number(item)
                if code == codes.SHORT_AXIS.value and unit == codes.UCUM_MM.value:
                    node["short"] = value
                    node["short_line"] = item
                elif code == codes.LONG_AXIS.value and unit == codes.UCUM_MM.value:
                    node["long"] = value
                    node["long_line"] = item
                elif code == codes.VOLUME.value and unit == codes.UCUM_MM3.value:
                    node["volume"] = value
                elif code == codes.PROBABILITY_OF_CANCER.value and unit == codes.UCUM_PERCENT.value:
                    node["probability"] = value / 100.0
            elif code == _REFERENCED_SEGMENT:
                node["segment"] = int(item.ReferencedSOPSequence[0].ReferencedSegmentNumber)
    measured = [n for n in nodes.values() if "short" in n and "long" in n]
    centroids, at_edge = _segment_geometry(seg, volume) if seg is not None else ({}, set())
    by_uid = {str(ds.SOPInstanceUID): ds for ds in images}
    out = []
    for n in measured:
        if "segment" not in n and not _drawn(n["long_line"]):
            continue  # sizes without outline or line: measured at a prior node's place, no finding
        centroid = centroids.get(n["uid"])
        if centroid is None:
            centroid = _line_midpoint(n["long_line"], by_uid)
        if centroid is None:
            raise FollowUpError(
                f"node {n.get('label', n['uid'])}: no position; give the prior's SEG (its segment "
                "with the same tracking UID) or the CT images its axis lines are drawn on"
            )
        out.append(
            PriorNode(
                label=n.get("label", ""),
                tracking_uid=n["uid"],
                centroid_lps_mm=centroid,
                short_axis_mm=n["short"],
                long_axis_mm=n["long"],
                volume_mm3=n.get("volume"),
                malignancy_probability=n.get("probability"),
                at_scan_edge=n["uid"] in at_edge,
            )
        )
    return tuple(out)


def read_prior_study(
    sr: Dataset, seg: Dataset | None = None, *, images: Sequence[Dataset] = (), volume: Volume | None = None
) -> PriorStudy:
    """The `PriorStudy` of nodal's SR `sr` (source ``"sr"``); see `read_prior_nodes`."""
    evidence = sr.get("CurrentRequestedProcedureEvidenceSequence") or []
    series = [
        str(s.SeriesInstanceUID)
        for study in evidence
        for s in study.get("ReferencedSeriesSequence", [])
        if seg is None or str(s.SeriesInstanceUID) != str(seg.SeriesInstanceUID)
    ]
    return PriorStudy(
        study_instance_uid=str(sr.StudyInstanceUID),
        series_instance_uid=series[0] if series else "",
        study_date=str(sr.get("StudyDate", "") or ""),
        nodes=read_prior_nodes(sr, seg, images=images, volume=volume),
        volume=volume,
        source=FROM_SR,
        frame_of_reference_uid=str(sr.get("FrameOfReferenceUID", "") or ""),
    )


def _groups(sr: Dataset) -> Iterable[Dataset]:
    """Every measurement group (DCM 125007) in the content tree."""
    stack = list(sr.get("ContentSequence", []))
    while stack:
        item = stack.pop(0)
        if item.get("ValueType") == "CONTAINER" and _code(item) == _MEASUREMENT_GROUP:
            yield item
        else:
            stack.extend(item.get("ContentSequence", []))


def _of_the_prior(group: Dataset) -> bool:
    """Whether a follow-up SR's group holds values of the earlier time point (TID 1502): its
    Time Point Order is 1, or, without an order, its Time Point text names the prior."""
    order = _first(group, _TIME_POINT_ORDER, "NumericValue", num=True)
    if order is not None:
        return order == PRIOR_ORDER
    text = _first(group, _TIME_POINT, "TextValue")
    return text is not None and (text == PRIOR_NAME or text.startswith(PRIOR_NAME + " "))


def _code(item: Dataset) -> str:
    names = item.get("ConceptNameCodeSequence")
    return str(names[0].CodeValue) if names else ""


def _first(group: Dataset, code: str, keyword: str, *, num: bool = False):
    for item in group.get("ContentSequence", []):
        if _code(item) != code:
            continue
        if num:
            return _number(item)[0]
        return str(item.get(keyword))
    return None


def _derived(item: Dataset) -> bool:
    """A NUM with a Derivation modifier (a change, a total) is not the node's own value."""
    return any(_code(child) == _DERIVATION for child in item.get("ContentSequence", []))


def _number(item: Dataset) -> tuple[float, str]:
    mv = item.get("MeasuredValueSequence")
    if not mv:
        return float("nan"), ""
    unit = mv[0].MeasurementUnitsCodeSequence[0].CodeValue
    return float(mv[0].NumericValue), str(unit)


def _segment_geometry(
    seg: Dataset, volume: Volume | None
) -> tuple[dict[str, tuple[float, float, float]], set[str]]:
    """Tracking UID -> centroid (LPS mm) of each segment of nodal's SEG; and the tracking
    UIDs of the segments that reach the edge of `volume` (its first or last slice, row or
    column), none without it."""
    uid_of = {int(s.SegmentNumber): str(s.get("TrackingUID", "")) for s in seg.SegmentSequence}
    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    spacing = np.asarray(shared.PixelMeasuresSequence[0].PixelSpacing, float)  # row, column
    frames = seg.pixel_array
    if frames.ndim == 2:
        frames = frames[None]
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    edge: set[int] = set()
    for f, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        rows, cols = np.nonzero(frames[f])
        if rows.size == 0:
            continue
        origin = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float)
        points = (
            origin
            + np.outer(cols * spacing[1], orientation[:3])
            + np.outer(rows * spacing[0], orientation[3:])
        )
        sums[number] = sums.get(number, np.zeros(3)) + points.sum(axis=0)
        counts[number] = counts.get(number, 0) + rows.size
        if volume is not None and _at_edge(points, volume):
            edge.add(number)
    centroids: dict[str, tuple[float, float, float]] = {
        uid_of[n]: tuple(float(v) for v in sums[n] / counts[n])  # type: ignore[misc]
        for n in sums
        if uid_of.get(n)
    }
    return centroids, {uid_of[n] for n in edge if uid_of.get(n)}


def _at_edge(points: np.ndarray, volume: Volume) -> bool:
    """Whether any of `points` (LPS mm) lies on the first or last slice, row or column of
    `volume`. Points outside it (a SEG of another series than this CT) mark nothing."""
    affine = np.asarray(volume.affine, float)
    kji = np.rint((points - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T)
    last = np.asarray(volume.shape) - 1
    inside = kji[((kji >= 0) & (kji <= last)).all(axis=1)]
    return bool(((inside == 0) | (inside == last)).any())


def _drawn(item: Dataset) -> bool:
    """Whether NUM `item` has its line (SCOORD) drawn under it."""
    return any(child.get("ValueType") == "SCOORD" for child in item.get("ContentSequence", []))


def _line_midpoint(item: Dataset, images: dict[str, Dataset]) -> tuple[float, float, float] | None:
    """Midpoint (LPS mm) of the SCOORD line under NUM `item`, on its referenced image."""
    for child in item.get("ContentSequence", []):
        if child.get("ValueType") != "SCOORD":
            continue
        points = np.asarray(child.GraphicData, float).reshape(-1, 2)
        for ref in child.get("ContentSequence", []):
            image = images.get(str(ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
            if image is None or "ImagePositionPatient" not in image:
                continue
            column, row = points.mean(axis=0) - 0.5  # SCOORD (0, 0) is the top-left corner
            orientation = np.asarray(image.ImageOrientationPatient, float)
            spacing = np.asarray(image.PixelSpacing, float)
            p = (
                np.asarray(image.ImagePositionPatient, float)
                + column * spacing[1] * orientation[:3]
                + row * spacing[0] * orientation[3:]
            )
            return (float(p[0]), float(p[1]), float(p[2]))
    return None
