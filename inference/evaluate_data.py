"""`nodal evaluate --data DIR`: the phantom evaluation's scores on a site's labelled cases.

Ground-truth nodes are the connected components (26-connected) of the label > 0; a node
is malignant when most of its voxels are 2. Its short and long axis are measured the way
nodal measures its findings (`inference.measure`, on the axial slice of greatest area)
and its volume is voxels x voxel volume. Matching, the threshold baseline and the scores
are those of `inference.evaluate`; malignancy is scored against the label (there is no
criterion label beside it as in phantoms).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from inference.datasets import MALIGNANT, CaseRef, SiteDataset
from inference.evaluate import (
    SENSITIVITY_MIN_SHORT_AXIS_MM,
    THRESHOLD_BASELINE_HU,
    _bias,
    _mae,
    _r,
    auc,
    best_per_node,
    found_by_size,
    hit_rule,
    match,
    threshold_baseline,
)
from inference.findings import Finding
from inference.measure import axial_diameters
from inference.model_store import LoadedModel
from inference.pipeline import PipelineSettings, analyse


@dataclass(frozen=True)
class TruthNode:
    index: int  # value in the instance map
    short_axis_mm: float
    long_axis_mm: float
    volume_mm3: float
    malignant: bool


@dataclass(frozen=True)
class _Image:
    """What `threshold_baseline` reads of a phantom."""

    hu: np.ndarray
    affine: np.ndarray


def truth_nodes(label: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, list[TruthNode]]:
    """The node instance map of a 0/1/2 label and each node's measurements."""
    spacing = [float(np.linalg.norm(affine[:3, a])) for a in range(3)]
    inst, _ = ndimage.label(label > 0, structure=np.ones((3, 3, 3)))
    nodes = []
    for idx, sl in enumerate(ndimage.find_objects(inst), start=1):
        m = inst[sl] == idx
        key = int(np.argmax(m.sum(axis=(1, 2))))
        try:
            d = axial_diameters(m[key].astype(float), (spacing[1], spacing[2]))
            short, long = d.short_mm, d.long_mm
        except ValueError:  # a node of a pixel or two on its largest slice
            rows, cols = np.nonzero(m[key])
            ext = sorted([(np.ptp(rows) + 1) * spacing[1], (np.ptp(cols) + 1) * spacing[2]])
            short, long = ext
        nodes.append(
            TruthNode(
                index=idx,
                short_axis_mm=float(short),
                long_axis_mm=float(long),
                volume_mm3=float(m.sum() * np.prod(spacing)),
                malignant=bool((label[sl][m] == MALIGNANT).mean() > 0.5),
            )
        )
    return inst.astype(np.int32), nodes


def evaluate_cases(
    model: LoadedModel,
    cases: Sequence[CaseRef],
    settings: PipelineSettings | None = None,
) -> dict:
    """The scores of `inference.evaluate.evaluate` on labelled site cases."""
    gt_rows: list[tuple[TruthNode, bool]] = []
    pred_rows: list[tuple[TruthNode, Finding, float]] = []
    fps: list[int] = []
    dups: list[int] = []
    base_fps: list[int] = []
    base_hits: list[bool] = []
    seconds: list[float] = []
    for ref in cases:
        case = ref.load()
        inst, nodes = truth_nodes(case.label, case.affine)
        t = time.perf_counter()
        analysis = analyse(case.as_volume(), model, settings)
        seconds.append(time.perf_counter() - t)
        findings = analysis.findings.findings
        matches = match(inst, [(f.bbox, f.mask) for f in findings])
        fps.append(sum(m.gt == 0 for m in matches))
        best = best_per_node(zip(findings, matches, strict=True))
        dups.append(sum(m.gt != 0 for m in matches) - len(best))
        for node in nodes:
            gt_rows.append((node, node.index in best))
            if node.index in best:
                f, m = best[node.index]
                pred_rows.append((node, f, m.dice))
        bm = match(inst, threshold_baseline(_Image(case.hu, case.affine)))
        base_fps.append(sum(m.gt == 0 for m in bm))
        found = {m.gt for m in bm if m.gt}
        base_hits.extend(
            node.index in found for node in nodes if node.short_axis_mm >= SENSITIVITY_MIN_SHORT_AXIS_MM
        )

    big = [hit for node, hit in gt_rows if node.short_axis_mm >= SENSITIVITY_MIN_SHORT_AXIS_MM]
    labelled = [node.malignant for node, _, _ in pred_rows]
    axes = [
        (f.short_axis.length_mm, n.short_axis_mm, f.long_axis.length_mm, n.long_axis_mm)
        for n, f, _ in pred_rows
    ]
    return {
        "cases": len(cases),
        "nodes": len(gt_rows),
        "nodes_short_axis_ge_5mm": len(big),
        "sensitivity": _r(np.mean(big)) if big else None,
        "sensitivity_all_sizes": _r(np.mean([hit for _, hit in gt_rows])) if gt_rows else None,
        "found_by_size": found_by_size(gt_rows),
        "fp_per_volume": _r(np.mean(fps)) if fps else None,
        "duplicates_per_volume": _r(np.mean(dups)) if dups else None,
        "dice": _r(np.mean([d for _, _, d in pred_rows])) if pred_rows else None,
        "short_axis_mae_mm": _mae([(a[0], a[1]) for a in axes]),
        "long_axis_mae_mm": _mae([(a[2], a[3]) for a in axes]),
        "short_axis_bias_mm": _bias([(a[0], a[1]) for a in axes]),
        "long_axis_bias_mm": _bias([(a[2], a[3]) for a in axes]),
        "volume_mape": _r(np.mean([abs(f.volume_mm3 - n.volume_mm3) / n.volume_mm3 for n, f, _ in pred_rows]))
        if pred_rows
        else None,
        "auc": _r(auc([f.malignancy_probability for _, f, _ in pred_rows], labelled)),
        "auc_size_rule": _r(auc([f.short_axis.length_mm for _, f, _ in pred_rows], labelled)),
        "malignant_nodes": int(sum(node.malignant for node, _ in gt_rows)),
        "hit_rule": hit_rule(),
        "threshold_baseline": {
            "window_hu": list(THRESHOLD_BASELINE_HU),
            "sensitivity": _r(np.mean(base_hits)) if base_hits else None,
            "fp_per_volume": _r(np.mean(base_fps)) if base_fps else None,
        },
        "seconds_per_case": _r(np.mean(seconds)) if seconds else None,
        "model": {"name": model.name, "version": model.version, "device": model.device.type},
    }


def evaluate_dataset(
    model: LoadedModel, dataset: SiteDataset, split: str = "auto", settings: PipelineSettings | None = None
) -> dict:
    """Score `model` on one split of `dataset` (auto: the test split, else the training cases)."""
    if split == "auto":
        split, cases = dataset.evaluation_cases()
    else:
        cases = dataset.split(split)
    if not cases:
        raise ValueError(f"{dataset.root} ({dataset.layout}) has no {split} cases to evaluate on")
    result = evaluate_cases(model, cases, settings)
    result["data"] = {"layout": dataset.layout, "split": split, "cases": len(cases)}
    return result
