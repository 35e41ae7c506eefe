"""The inference job: a CT volume and a loaded model in, per-node findings out.

volume -> working grid -> U-Net probability -> connected components -> per node: mask on
the native grid, RECIST diameters, volume, mean HU -> verification (drop what is not a
node, when the model has a verifier; then what its checker, a CNN on the crop, takes for
a look-alike; with the card's `segmenter.necks`, the parts of a rejected component judged
in its place, `inference.necks`) -> each node's edge settled on the image and measured
again (`inference.refine`) -> every voxel to at most one node (`inference.nodes.exclusive`;
the findings are measured from those same masks) -> classifier probability and rule
category -> `StudyFindings`.
"""

from __future__ import annotations

import functools
import hashlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from inference import plausibility, rules, verify
from inference.classify import MIN_FIELD, crop_probabilities
from inference.findings import Finding, ModelInfo, StudyFindings
from inference.model_store import LoadedModel
from inference.nodes import (
    Candidate,
    components,
    exclusive,
    focus_on_working,
    measure_node,
    node_focus,
    parts_of,
    refined,
    rejoined,
    working_crop,
)
from inference.preprocess import Grid, to_working, working_grid, working_patch
from inference.segment import node_probability
from inference.uids import deterministic_uid
from inference.volume import Volume

if TYPE_CHECKING:
    from inference.followup.look import Judge


@dataclass(frozen=True)
class PipelineSettings:
    threshold: float | None = None  # node mask threshold; None: the model's (LoadedModel.threshold)
    min_volume_mm3: float = 20.0
    roi: int = 96
    overlap: float = 0.25
    batch_size: int = 2
    boundary_refine_mm: float = 3.0  # settle each node's edge on the image within this (0: off)
    plausibility: bool = True  # apply the model card's plausibility rules (inference.plausibility)


@dataclass
class Analysis:
    findings: StudyFindings
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall time


def detect(
    volume: Volume, model: LoadedModel, settings: PipelineSettings | None = None
) -> tuple[list[tuple[Candidate, dict]], dict[str, float]]:
    """Segment and measure: every measured candidate (before verification) and stage times."""
    pairs, seconds, _, _ = _detect(volume, model, settings)
    return pairs, seconds


def _detect(volume: Volume, model: LoadedModel, settings: PipelineSettings | None):
    """`detect`, and the working-grid image and its grid (for the classifier's crops)."""
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
        flips=model.segmenter_flips,
    )
    seconds["segment"] = time.perf_counter() - t

    t = time.perf_counter()
    splits = model.necks is not None and model.checker is not None  # parts judged where it rejects
    threshold = mask_threshold(s, model)
    candidates = components(volume, image_w, prob, grid, threshold, s.min_volume_mm3, keep_working=splits)
    measured = [
        (c, m)
        for c, m in ((c, measure_node(volume, c)) for c in candidates)
        if m is not None and m["volume_mm3"] >= s.min_volume_mm3
    ]
    seconds["measure"] = time.perf_counter() - t
    return measured, seconds, image_w, grid


def mask_threshold(settings: PipelineSettings, model: LoadedModel) -> float:
    """The node mask threshold: the settings' where given, else the model's own."""
    return model.threshold if settings.threshold is None else settings.threshold


def candidate_features(volume: Volume, candidate: Candidate, measured: dict) -> np.ndarray:
    """The verification features of one measured candidate (see inference.verify)."""
    k0, j0, i0, k1, j1, i1 = candidate.bbox
    margin = verify.shell_margin(volume.spacing)
    lo = [max(0, a - m) for a, m in zip((k0, j0, i0), margin, strict=True)]
    hi = [min(n, b + m) for b, m, n in zip((k1, j1, i1), margin, volume.shape, strict=True)]
    return verify.features(
        measured["mask"],
        volume.array[k0:k1, j0:j1, i0:i1],
        candidate.soft,
        volume.spacing,
        measured["short"].length_mm,
        measured["long"].length_mm,
        hu_around=volume.array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]],
        offset=(k0 - lo[0], j0 - lo[1], i0 - lo[2]),
    )


def checker_crops(
    crop: str, pairs: list[tuple[Candidate, dict]], image_w: np.ndarray, grid: Grid
) -> list[np.ndarray]:
    """The checker's input for each measured candidate: the classifier's crop of the whole
    candidate, a crop centred on and scaled to the node as measured (`crop` "node"), or
    both stacked (`inference.classify.CROP_KINDS`)."""
    if crop == "both":
        return [
            np.concatenate(both)
            for both in zip(
                checker_crops("candidate", pairs, image_w, grid),
                checker_crops("node", pairs, image_w, grid),
                strict=True,
            )
        ]
    if crop == "candidate":
        return [m["crop"] for _, m in pairs]
    return [
        working_crop(
            image_w,
            grid,
            c.mask,
            c.bbox,
            focus=node_focus(c.mask, c.bbox, m["key_slice"], m["long"].length_mm),
        )
        for c, m in pairs
    ]


def checker_probabilities(
    model: LoadedModel, pairs: list[tuple[Candidate, dict]], image_w: np.ndarray, grid: Grid
) -> list[float]:
    """The checker's probability that each measured candidate is a node (`checker_crops`);
    the model must have a checker."""
    assert model.checker is not None
    return crop_probabilities(
        model.checker.net,
        checker_crops(model.checker.crop, pairs, image_w, grid),
        [(m["short"].length_mm, m["long"].length_mm) for _, m in pairs],
        model.device,
        flips=model.checker.flips,
    )


def checker_keeps(
    model: LoadedModel,
    volume: Volume,
    structure: np.ndarray,
    origin: tuple[int, int, int],
    short_mm: float,
    long_mm: float,
) -> bool:
    """Whether the model's checker keeps a structure found outside the pipeline (a look at a
    node's place, `inference.followup.look.Judge`) as it keeps its own candidates. True when
    the model has no checker."""
    if model.checker is None or not structure.any():
        return True
    checker = model.checker
    crop = structure_crop(volume, structure, origin, model.working_spacing, checker.crop, long_mm)
    [p] = crop_probabilities(checker.net, [crop], [(short_mm, long_mm)], model.device, flips=checker.flips)
    return p >= checker.threshold


def look_judge(model: LoadedModel) -> Judge | None:
    """The model's verdict on what a look at a node's place measures
    (`inference.followup.look.Judge`): its checker, as on its own candidates; None when the
    model has no checker."""
    return None if model.checker is None else functools.partial(checker_keeps, model)


def structure_crop(
    volume: Volume,
    structure: np.ndarray,
    origin: tuple[int, int, int],
    working_spacing: float,
    crop: str = "candidate",
    long_mm: float = 0.0,
) -> np.ndarray:
    """The crop networks' input for a structure given by its voxels in a box of `volume`
    that starts at `origin` (k, j, i), as the pipeline makes it for a node
    (`inference.nodes.working_crop` on the volume's working grid; `crop` "node": centred on
    its largest slice and scaled to `long_mm`, as `checker_crops`), resampling only the
    patch of the working grid that the crop's field covers; `crop` "both": the two stacked."""
    grid = working_grid(volume.array, volume.spacing, working_spacing)
    kinds = ("candidate", "node") if crop == "both" else (crop,)
    return np.concatenate([_structure_crop(volume, grid, structure, origin, kind, long_mm) for kind in kinds])


def _structure_crop(
    volume: Volume,
    grid: Grid,
    structure: np.ndarray,
    origin: tuple[int, int, int],
    crop: str,
    long_mm: float,
) -> np.ndarray:
    """`structure_crop` of one kind ("candidate" or "node") on the volume's working `grid`."""
    k0, j0, i0, k1, j1, i1 = _bbox(structure)
    lo, hi = np.add(origin, (k0, j0, i0)), np.add(origin, (k1, j1, i1))
    # one empty voxel around the structure, so that sampling it onto the working grid
    # interpolates across its edge as it does for a node's mask in its box
    mask = np.pad(structure[k0:k1, j0:j1, i0:i1], 1)
    bbox = (*(lo - 1), *(hi + 1))
    focus = None
    if crop == "node":
        key = int(bbox[0] + np.argmax(mask.sum(axis=(1, 2))))
        focus = node_focus(mask, bbox, key, long_mm)
        centre, extent = focus_on_working(grid, focus)
    else:
        lo_w, hi_w = grid.to_working(lo), grid.to_working(hi - 1)
        centre = (lo_w + hi_w) / 2
        extent = float((hi_w - lo_w).max() + 1)
    reach = max(MIN_FIELD, 1.4 * extent) / 2 + 2  # working voxels
    patch_lo = np.maximum(np.floor(centre - reach).astype(int), 0)
    patch_hi = np.minimum(np.ceil(centre + reach).astype(int) + 1, grid.working_shape)
    patch = working_patch(volume.array, grid, patch_lo, patch_hi)
    return working_crop(patch, grid, mask, bbox, image_origin_w=patch_lo, focus=focus)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int, int, int]:
    sl = ndimage.find_objects(mask.astype(np.uint8))[0]
    return (sl[0].start, sl[1].start, sl[2].start, sl[0].stop, sl[1].stop, sl[2].stop)


def analyse(volume: Volume, model: LoadedModel, settings: PipelineSettings | None = None) -> Analysis:
    measured_pairs, seconds, image_w, grid = _detect(volume, model, settings)
    if model.verifier is not None and measured_pairs:
        t = time.perf_counter()
        x = np.stack([candidate_features(volume, c, m) for c, m in measured_pairs])
        keep = model.verifier.keep(x)
        measured_pairs = [pair for pair, k in zip(measured_pairs, keep, strict=True) if k]
        seconds["verify"] = time.perf_counter() - t
    s = settings or PipelineSettings()
    if model.checker is not None and measured_pairs:
        t = time.perf_counter()
        p_node = checker_probabilities(model, measured_pairs, image_w, grid)
        kept = [p >= model.checker.threshold for p in p_node]
        rejected = [c for (c, _), k in zip(measured_pairs, kept, strict=True) if not k]
        measured_pairs = [pair for pair, k in zip(measured_pairs, kept, strict=True) if k]
        if model.necks is not None:
            measured_pairs += _kept_parts(volume, model, rejected, s, image_w, grid)
        seconds["check"] = time.perf_counter() - t
    if s.boundary_refine_mm > 0:
        t = time.perf_counter()
        measured_pairs = [
            _refined_pair(volume, c, m, s.boundary_refine_mm, image_w, grid) for c, m in measured_pairs
        ]
        seconds["refine"] = time.perf_counter() - t
    measured_pairs = _exclusive_pairs(volume, measured_pairs, image_w, grid)
    if s.plausibility and model.plausibility is not None and measured_pairs:
        t = time.perf_counter()
        measured_pairs = [
            (c, m)
            for c, m in measured_pairs
            if not plausibility.implausible(_verdict(volume, m, model.plausibility), model.plausibility)
        ]
        seconds["plausibility"] = time.perf_counter() - t
    measured = [m for _, m in measured_pairs]

    t = time.perf_counter()
    probs = crop_probabilities(
        model.classifier,
        [m["crop"] for m in measured],
        [(m["short"].length_mm, m["long"].length_mm) for m in measured],
        model.device,
        flips=model.classifier_flips,
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
        model=ModelInfo(model.name, model.version, model.device.type, model.max_slice_spacing_mm),
        findings=tuple(findings),
        slice_thickness_mm=volume.slice_thickness_mm,
    )
    return Analysis(result, seconds)


def _verdict(volume: Volume, m: dict, rules_: plausibility.Rules) -> dict[str, bool]:
    return plausibility.verdict_of(
        volume.array, volume.spacing, m["mask"], m["bbox"], m["short"], m["long"], m["key_slice"], rules_
    )


def _refined_pair(
    volume: Volume, c: Candidate, m: dict, grow_mm: float, image_w: np.ndarray, grid: Grid
) -> tuple[Candidate, dict]:
    """The node with its edge settled on the image and measured again (as it was when the
    refined edge cannot be measured)."""
    r = refined(volume, c, grow_mm, image_w, grid)
    if r is c:
        return c, m
    m2 = measure_node(volume, r)
    return (r, m2) if m2 is not None else (c, m)


def _kept_parts(
    volume: Volume,
    model: LoadedModel,
    rejected: list[Candidate],
    s: PipelineSettings,
    image_w: np.ndarray,
    grid: Grid,
) -> list[tuple[Candidate, dict]]:
    """The parts of the rejected candidates, split at their necks (`inference.necks`), which
    the checker keeps at the card's `part_threshold`, measured; the kept parts of one
    candidate joined again where they touch (`inference.nodes.rejoined`)."""
    assert model.necks is not None
    threshold = mask_threshold(s, model)
    split = [
        part
        for n, r in enumerate(rejected, start=1)
        for part in parts_of(r, n, model.necks, volume, image_w, grid, threshold, s.min_volume_mm3)
    ]
    parts = [
        (c, m)
        for c, m in ((c, measure_node(volume, c)) for c in split)
        if m is not None and m["volume_mm3"] >= s.min_volume_mm3
    ]
    if not parts:
        return []
    p_node = checker_probabilities(model, parts, image_w, grid)
    kept = [pair for pair, p in zip(parts, p_node, strict=True) if p >= model.necks.part_threshold]
    measured = {id(c): m for c, m in kept}
    out = []
    for c in rejoined([c for c, _ in kept], image_w, grid):
        m = measured.get(id(c)) or measure_node(volume, c)
        if m is not None:
            out.append((c, m))
    return out


def _exclusive_pairs(
    volume: Volume, pairs: list[tuple[Candidate, dict]], image_w: np.ndarray, grid: Grid
) -> list[tuple[Candidate, dict]]:
    """The nodes with no voxel in two of them (`inference.nodes.exclusive`); a node that
    lost voxels is measured again and gets its classifier crop from its new edge."""
    out = []
    for (c, m), e in zip(pairs, exclusive([c for c, _ in pairs]), strict=True):
        if e is c:
            out.append((c, m))
            continue
        if e is None:
            continue
        e.crop = working_crop(image_w, grid, e.mask, e.bbox)
        m2 = measure_node(volume, e)
        if m2 is not None:
            out.append((e, m2))
    return out


def _input_key(volume: Volume, model_version: str) -> str:
    h = hashlib.sha256()
    for ref in volume.slices:
        h.update(f"{ref.sop_instance_uid}/{ref.frame_number}\n".encode())
    return f"{volume.series_instance_uid}:{h.hexdigest()[:32]}:{model_version}"
