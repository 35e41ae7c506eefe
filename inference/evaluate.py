"""`nodal evaluate`: detection, segmentation, measurement and malignancy scores on held-out phantoms.

Phantom families (`FAMILIES`): `train`, the generator the demo model is trained on
(`inference.phantoms`, evaluated on seeds it never trained on); `variety`, the same
generator with its domain randomisation (`phantoms.variety_spec`: more anatomy, elongated
and clustered nodes, other acquisitions; what a site's CT varies in, drawn by the generator
that training may use); and `heldout`, an independent generator (`inference.phantoms_heldout`)
that no training, fitting or threshold choice ever sees; it measures how far the model
generalises beyond the habits of its own generator. Seeds start at `EVAL_SEED_BASE`, far
from every training seed. Malignancy is scored against each node's criterion label (before
label noise). A threshold baseline (an HU window on the smoothed image, components of
node-like volume) is scored with the same matching, to show what intensity alone achieves
on these phantoms.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy import ndimage

from inference import phantoms, phantoms_heldout, plausibility, rules
from inference.dicom_volume import CT_IMAGE_STORAGE
from inference.findings import SliceRef
from inference.model_store import LoadedModel
from inference.pipeline import PipelineSettings, analyse
from inference.progress import progress
from inference.train import EVAL_SEED_BASE
from inference.uids import deterministic_uid
from inference.volume import Volume

SENSITIVITY_MIN_SHORT_AXIS_MM = 5.0
THRESHOLD_BASELINE_HU = (15.0, 80.0)


#: Phantom families: name -> (generator(seed, spec), default spec, UID key); the variety
#: family has no one spec: each seed draws its own acquisition.
FAMILIES: dict[
    str, tuple[Callable[[int, Any], phantoms.Phantom | phantoms_heldout.HeldoutPhantom], Any, str]
] = {
    "train": (phantoms.generate, phantoms.PhantomSpec(), "nodal-phantom"),
    "variety": (phantoms.generate_variety, None, "nodal-phantom-variety"),
    "heldout": (phantoms_heldout.generate, phantoms_heldout.HeldoutSpec(), "nodal-phantom-heldout"),
}
DEFAULT_FAMILY = "train"


def phantom_volume(ph, family: str = DEFAULT_FAMILY) -> Volume:
    """The phantom as a loaded volume, without a round trip through DICOM files."""
    return array_volume(ph.hu.astype(np.float32), ph.affine, FAMILIES[family][2], str(ph.seed))


def array_volume(hu: np.ndarray, affine: np.ndarray, *key: str) -> Volume:
    """A volume from an array in HU (slice, row, column) and its affine; UIDs derived from `key`."""
    series = deterministic_uid(*key, "series")
    slices = tuple(SliceRef(deterministic_uid(series, str(k)), CT_IMAGE_STORAGE) for k in range(hu.shape[0]))
    return Volume(
        array=hu,
        affine=affine,
        slices=slices,
        study_instance_uid=deterministic_uid(*key, "study"),
        series_instance_uid=series,
        frame_of_reference_uid=deterministic_uid(*key, "for"),
    )


@dataclass
class _Match:
    gt: int  # node index, 0 = false positive
    dice: float


#: A finding hits the true node it overlaps most when their intersection over union is at
#: least this (the usual threshold of medical object detection). A finding mostly of other
#: tissue (a bowel loop with a small node on its wall) is then a false positive, not the node.
HIT_MIN_IOU = 0.1
#: How the verifier and the checker label their training candidates, as when the shipped
#: model was trained: a node when the overlap is this share of the smaller of the two.
TRAINING_MIN_OVERLAP = 0.1


def hit_rule() -> dict:
    """How an evaluation counted a hit, for its report (`match` without `training`)."""
    return {"min_iou": HIT_MIN_IOU}


def match(
    labels: np.ndarray, masks: list[tuple[tuple, np.ndarray]], *, training: bool = False
) -> list[_Match]:
    """Match each predicted (bbox, mask) to the ground-truth node it overlaps most, when the
    two overlap enough (`HIT_MIN_IOU`; with `training`, `TRAINING_MIN_OVERLAP`)."""
    out = []
    gt_sizes = np.bincount(labels.ravel())
    for bbox, mask in masks:
        k0, j0, i0, k1, j1, i1 = bbox
        hits = labels[k0:k1, j0:j1, i0:i1][mask]
        counts = np.bincount(hits, minlength=len(gt_sizes))
        counts[0] = 0
        best = int(np.argmax(counts))
        inter = int(counts[best])
        size, node = int(mask.sum()), int(gt_sizes[best])
        enough = (
            inter >= TRAINING_MIN_OVERLAP * min(size, node)
            if training
            else inter >= HIT_MIN_IOU * (size + node - inter)
        )
        if best == 0 or not enough:
            out.append(_Match(0, 0.0))
        else:
            out.append(_Match(best, 2 * inter / (size + node)))
    return out


def best_per_node(pairs) -> dict[int, tuple]:
    """For each ground-truth node that (finding, match) `pairs` found, the pair that overlaps
    it best; the other pairs on the same node are duplicates (a node reported twice)."""
    best: dict[int, tuple] = {}
    for f, m in pairs:
        if m.gt and (m.gt not in best or m.dice > best[m.gt][1].dice):
            best[m.gt] = (f, m)
    return best


def found_by_size(gt_rows) -> dict[str, list[int]]:
    """Nodes of short axis >= 5 mm found and present, [found, present], per RECIST 1.1 size
    class of their true short axis (`inference.rules`): where the misses lie."""
    out = {c: [0, 0] for c in rules.SIZE_CATEGORIES}
    for node, hit in gt_rows:
        if node.short_axis_mm >= SENSITIVITY_MIN_SHORT_AXIS_MM:
            counts = out[rules.size_category(node.short_axis_mm)]
            counts[0] += int(hit)
            counts[1] += 1
    return out


def auc(scores: list[float], positive: list[bool]) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with ties counted half)."""
    s, y = np.asarray(scores, float), np.asarray(positive, bool)
    if y.all() or not y.any():
        return None
    pos, neg = s[y], s[~y]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def threshold_baseline(ph) -> list[tuple[tuple, np.ndarray]]:
    lo, hi = THRESHOLD_BASELINE_HU
    smooth = ndimage.gaussian_filter(ph.hu.astype(np.float32), 1.0)
    lab, _ = ndimage.label((smooth >= lo) & (smooth <= hi))
    vox = float(np.prod([np.linalg.norm(ph.affine[:3, a]) for a in range(3)]))
    out = []
    for idx, sl in enumerate(ndimage.find_objects(lab), start=1):
        m = lab[sl] == idx
        if 20.0 <= m.sum() * vox <= 30000.0:
            out.append(((*(s.start for s in sl), *(s.stop for s in sl)), m))
    return out


def evaluate(
    model: LoadedModel,
    cases: int = 20,
    seed: int = EVAL_SEED_BASE,
    spec=None,
    settings: PipelineSettings | None = None,
    family: str = DEFAULT_FAMILY,
) -> dict:
    """Score `model` on `cases` phantoms of `family`.

    The headline figures are the pipeline's own (with the model card's plausibility rules
    when `settings.plausibility` is on). The pipeline runs once with the rules off, and
    every candidate is judged by every rule, so `plausibility` reports, from the same run,
    the figures without the rules and what each rule alone removes (false positives) and
    costs (nodes of short axis >= 5 mm no longer found)."""
    if seed < EVAL_SEED_BASE:
        raise ValueError(f"evaluation seeds start at {EVAL_SEED_BASE} (training seeds are below)")
    if family not in FAMILIES:
        raise ValueError(f"unknown phantom family {family!r}; choose one of {', '.join(FAMILIES)}")
    generate, default_spec, _ = FAMILIES[family]
    spec = spec or default_spec
    settings = settings or PipelineSettings()
    rules = model.plausibility if settings.plausibility else None
    judged = rules or plausibility.Rules()
    runs: list[tuple] = []
    base_fps: list[int] = []
    base_hits: list[bool] = []
    seconds: list[float] = []
    drawn: list = []
    for n in progress(range(cases), cases, f"{family} phantoms"):
        ph = generate(seed + n, spec)
        drawn.append(getattr(ph, "acquisition", None))
        volume = phantom_volume(ph, family)
        t = time.perf_counter()
        analysis = analyse(volume, model, replace(settings, plausibility=False))
        findings = analysis.findings.findings
        verdicts = [
            plausibility.verdict_of(
                volume.array, volume.spacing, f.mask, f.bbox, f.short_axis, f.long_axis, f.key_slice, judged
            )
            for f in findings
        ]
        seconds.append(time.perf_counter() - t)
        matches = match(ph.labels, [(f.bbox, f.mask) for f in findings])
        runs.append((ph.nodes, findings, matches, verdicts))
        bm = match(ph.labels, threshold_baseline(ph))
        base_fps.append(sum(m.gt == 0 for m in bm))
        found = {m.gt for m in bm if m.gt}
        base_hits.extend(
            node.index in found for node in ph.nodes if node.short_axis_mm >= SENSITIVITY_MIN_SHORT_AXIS_MM
        )

    headline = _score(runs, _rejected_by(rules.enabled() if rules else ()))
    without = _score(runs, _rejected_by(()))
    with_all = _score(runs, _rejected_by(judged.enabled()))
    per_rule = rule_effects(runs, rules.enabled() if rules else ())
    for d in (headline, without, with_all):
        d.pop("_found_ge_5mm")
        d.pop("_fps")
    brief = ("sensitivity", "fp_per_volume", "dice", "short_axis_mae_mm", "auc", "auc_size_rule")
    return {
        "family": family,
        "cases": cases,
        "seeds": [seed, seed + cases - 1],
        # the training generator's revision (`phantoms.revision`): one seed, other phantoms
        **(
            {"generator_revision": phantoms.revision(family == "variety")}
            if family in ("train", "variety")
            else {}
        ),
        **headline,
        "hit_rule": hit_rule(),
        "threshold_baseline": {
            "window_hu": list(THRESHOLD_BASELINE_HU),
            "sensitivity": _r(np.mean(base_hits)) if base_hits else None,
            "fp_per_volume": _r(np.mean(base_fps)),
        },
        "plausibility": {
            "applied": list(rules.enabled()) if rules else [],
            "thresholds": judged.to_card()["thresholds"],
            "without_rules": {k: without[k] for k in brief},
            "with_rules": {k: with_all[k] for k in brief},
            "per_rule": per_rule,
        },
        "seconds_per_case": _r(np.mean(seconds)),
        "model": {"name": model.name, "version": model.version, "device": model.device.type},
        "phantom": _describe(spec, drawn, range(seed, seed + cases)),
    }


def _score(runs, rejected) -> dict:
    """Detection, measurement and malignancy figures of the findings that `rejected` keeps."""
    gt_rows, pred_rows, fps, dups = [], [], [], []
    for nodes, findings, matches, verdicts in runs:
        kept = [(f, m) for f, m, v in zip(findings, matches, verdicts, strict=True) if not rejected(v)]
        fps.append(sum(m.gt == 0 for _, m in kept))
        best = best_per_node(kept)
        dups.append(sum(m.gt != 0 for _, m in kept) - len(best))
        for node in nodes:
            gt_rows.append((node, node.index in best))
            if node.index in best:
                f, m = best[node.index]
                pred_rows.append((node, f, m.dice))
    big = [hit for node, hit in gt_rows if node.short_axis_mm >= SENSITIVITY_MIN_SHORT_AXIS_MM]
    crit = [node.malignant_criterion for node, _, _ in pred_rows]
    return {
        "nodes": len(gt_rows),
        "nodes_short_axis_ge_5mm": len(big),
        "sensitivity": _r(np.mean(big)) if big else None,
        "sensitivity_all_sizes": _r(np.mean([hit for _, hit in gt_rows])) if gt_rows else None,
        "found_by_size": found_by_size(gt_rows),
        "fp_per_volume": _r(np.mean(fps)),
        "duplicates_per_volume": _r(np.mean(dups)),
        "dice": _r(np.mean([d for _, _, d in pred_rows])) if pred_rows else None,
        "short_axis_mae_mm": _mae([(f.short_axis.length_mm, n.short_axis_mm) for n, f, _ in pred_rows]),
        "long_axis_mae_mm": _mae([(f.long_axis.length_mm, n.long_axis_mm) for n, f, _ in pred_rows]),
        "short_axis_bias_mm": _bias([(f.short_axis.length_mm, n.short_axis_mm) for n, f, _ in pred_rows]),
        "long_axis_bias_mm": _bias([(f.long_axis.length_mm, n.long_axis_mm) for n, f, _ in pred_rows]),
        "volume_mape": _r(np.mean([abs(f.volume_mm3 - n.volume_mm3) / n.volume_mm3 for n, f, _ in pred_rows]))
        if pred_rows
        else None,
        "auc": _r(auc([f.malignancy_probability for _, f, _ in pred_rows], crit)),
        "auc_size_rule": _r(auc([f.short_axis.length_mm for _, f, _ in pred_rows], crit)),
        "malignant_nodes": int(sum(crit)),
        "_found_ge_5mm": int(sum(big)),
        "_fps": int(sum(fps)),
    }


def _rejected_by(rules: tuple[str, ...]):
    """A verdict filter: True where the verdict breaks any of `rules`."""
    return lambda verdict: any(verdict[r] for r in rules)


def rule_effects(runs, applied: tuple[str, ...] = ()) -> dict[str, dict]:
    """What each plausibility rule does to the findings of `runs` (nodes, findings, matches,
    verdicts per phantom): alone, the false positives it removes, the nodes >= 5 mm it loses,
    and those per RECIST 1.1 size class of their true short axis (`found_by_size`); for a
    rule among `applied` (the model's rules), also `marginal`: what it removes and loses on
    top of the other applied rules, i.e. what taking it out of them brings back (not what it
    does alone where another applied rule rejects the same finding, or another finding of
    the same node)."""

    def change(before: dict, after: dict) -> dict:
        return {
            "fp_removed": before["_fps"] - after["_fps"],
            "nodes_lost": before["_found_ge_5mm"] - after["_found_ge_5mm"],
            "nodes_lost_by_size": {
                size: found[0] - after["found_by_size"][size][0]
                for size, found in before["found_by_size"].items()
            },
        }

    without = _score(runs, _rejected_by(()))
    applied_score = _score(runs, _rejected_by(applied))
    effects = {}
    for rule in plausibility.RULES:
        effects[rule] = change(without, _score(runs, _rejected_by((rule,))))
        if rule in applied:
            others = tuple(r for r in applied if r != rule)
            effects[rule]["marginal"] = change(_score(runs, _rejected_by(others)), applied_score)
    return effects


def _describe(spec, drawn: list, seeds: range) -> dict:
    if spec is None:  # the variety family: one drawn acquisition per seed
        specs = [phantoms.variety_spec(s) for s in seeds]

        def span(attr):
            return [min(getattr(s, attr) for s in specs), max(getattr(s, attr) for s in specs)]

        return {k: span(k) for k in ("rows", "slices", "pixel_spacing_mm", "slice_spacing_mm", "noise_hu")}
    if isinstance(spec, phantoms.PhantomSpec):
        return {
            "rows": spec.rows,
            "slices": spec.slices,
            "pixel_spacing_mm": spec.pixel_spacing_mm,
            "slice_spacing_mm": spec.slice_spacing_mm,
        }
    acq = [a for a in drawn if a is not None]
    if not acq:
        return {}

    def count(attr):
        values = [getattr(a, attr) for a in acq]
        return {str(v): values.count(v) for v in sorted(set(values), key=str)}

    return {
        "rows": spec.matrix,
        "pixel_spacing_mm": [min(a.pixel_mm for a in acq), max(a.pixel_mm for a in acq)],
        "slice_spacing_mm": count("slice_mm"),
        "slices": [min(a.slices for a in acq), max(a.slices for a in acq)],
        "kernel": count("kernel"),
        "phase": count("phase"),
        "region": count("region"),
        "metal": sum(a.metal for a in acq),
    }


def _r(v) -> float | None:
    return None if v is None else round(float(v), 4)


def _bias(pairs) -> float | None:
    """Mean signed error (measured - truth); negative: measured too short."""
    return _r(np.mean([a - b for a, b in pairs])) if pairs else None


def _mae(pairs) -> float | None:
    return _r(np.mean([abs(a - b) for a, b in pairs])) if pairs else None
