"""The inference job: a CT volume and a loaded model in, per-node findings out.

volume -> working grid -> U-Net probability -> connected components -> per node: mask on
the native grid, RECIST diameters, volume, mean HU -> classifier probability and rule
category -> `StudyFindings`.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

from inference import rules
from inference.classify import malignancy_probabilities
from inference.findings import Finding, ModelInfo, StudyFindings
from inference.model_store import LoadedModel
from inference.nodes import components, measure_node
from inference.preprocess import to_working
from inference.segment import node_probability
from inference.uids import deterministic_uid
from inference.volume import Volume


@dataclass(frozen=True)
class PipelineSettings:
    threshold: float = 0.5
    min_volume_mm3: float = 20.0
    roi: int = 96
    overlap: float = 0.25
    batch_size: int = 2


@dataclass
class Analysis:
    findings: StudyFindings
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall time


def analyse(
    volume: Volume, model: LoadedModel, settings: PipelineSettings | None = None
) -> Analysis:
    s = settings or PipelineSettings()
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    image_w, grid = to_working(volume.array, volume.spacing, model.working_spacing)
    seconds["preprocess"] = time.perf_counter() - t

    t = time.perf_counter()
    prob = node_probability(
        model.segmenter,
        image_w,
        model.device,
        roi=s.roi,
        overlap=s.overlap,
        batch_size=s.batch_size,
    )
    seconds["segment"] = time.perf_counter() - t

    t = time.perf_counter()
    candidates = components(volume, image_w, prob, grid, s.threshold, s.min_volume_mm3)
    measured = [
        m
        for m in (measure_node(volume, c) for c in candidates)
        if m is not None and m["volume_mm3"] >= s.min_volume_mm3
    ]
    seconds["measure"] = time.perf_counter() - t

    t = time.perf_counter()
    probs = malignancy_probabilities(
        model.classifier,
        [m["crop"] for m in measured],
        [(m["short"].length_mm, m["long"].length_mm) for m in measured],
        model.device,
    )
    seconds["classify"] = time.perf_counter() - t

    measured_sorted = sorted(zip(measured, probs, strict=True), key=lambda mp: -mp[0]["volume_mm3"])
    basis = _input_key(volume, model.version)
    findings = []
    for n, (m, p) in enumerate(measured_sorted, start=1):
        label = f"LN-{n}"
        findings.append(
            Finding(
                label=label,
                tracking_uid=deterministic_uid("nodal-tracking", basis, label),
                bbox=m["bbox"],
                mask=m["mask"],
                centroid_lps_mm=m["centroid_lps"],
                centroid_voxel=m["centroid_voxel"],
                key_slice=m["key_slice"],
                long_axis=m["long"],
                short_axis=m["short"],
                volume_mm3=m["volume_mm3"],
                mean_hu=m["mean_hu"],
                malignancy_probability=p,
                size_category=rules.size_category(m["short"].length_mm),
                flags=m["flags"],
            )
        )
    result = StudyFindings(
        study_instance_uid=volume.study_instance_uid,
        series_instance_uid=volume.series_instance_uid,
        frame_of_reference_uid=volume.frame_of_reference_uid,
        slices=volume.slices,
        shape=volume.shape,
        affine=volume.affine,
        model=ModelInfo(model.name, model.version, model.device.type),
        findings=tuple(findings),
    )
    return Analysis(result, seconds)


def _input_key(volume: Volume, model_version: str) -> str:
    h = hashlib.sha256()
    for ref in volume.slices:
        h.update(f"{ref.sop_instance_uid}/{ref.frame_number}\n".encode())
    return f"{volume.series_instance_uid}:{h.hexdigest()[:32]}:{model_version}"
