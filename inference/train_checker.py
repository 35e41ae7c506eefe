"""Fit the checker of a trained model: a small 3D CNN that tells a node from a look-alike.

The verifier (`inference.verify`) judges a candidate by a few numbers (size, density, its
shell). What tells a piece of bowel or a vessel from a node is often in the image around
it: a wall around content, a tube that runs on out of the candidate. The checker sees the
CT and the candidate's mask in a cube (`inference.classify.crop_around`), with its short and
long axis, and gives the probability that it is a node: the false-positive reduction stage
of the lymph-node CAD literature (a CNN on candidate patches), here on the model's own
candidates. It sees two cubes (`CROP_KIND` "both", `inference.pipeline.checker_crops`): the
classifier's, 1.4 times the whole candidate ("candidate"), which shows a bowel loop's or a
vessel's whole length, and one centred on the node as measured and 1.4 times its long axis
("node"), in which a node joined to a vessel fills the cube as a lone node does (in the
candidate's cube it shrinks to a dot beside a tube). The first two checkers saw the
candidate's cube alone, the third the node's.

Training data: every candidate the model's segmenter finds (before the verifier) in
training phantoms, plain and domain-randomised (`phantoms.variety_spec`), from
`CHECKER_SEED_BASE` up: apart from the segmenter's and the verifier's seeds, below the
evaluation seeds. A candidate is a node by the matching `nodal evaluate` uses.

Scoring: the mean logit over the crop's eight mirror images (the network is trained with
random flips), in the fit as in the pipeline.

The threshold: the phantoms are split in folds; each fold is scored by a checker fitted
on the others, and the threshold keeps `keep_share` of the nodes that the verifier keeps
(the checker runs after it). The checker stored is then fitted on all phantoms.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from inference import phantoms
from inference.classify import crop_channels, crop_probabilities
from inference.evaluate import match, phantom_volume
from inference.model_store import add_checker, load_model, read_card
from inference.pipeline import PipelineSettings, _detect, candidate_features, checker_crops
from inference.progress import progress
from inference.train import EVAL_SEED_BASE, TrainConfig, train_classifier, training_spec

log = logging.getLogger("nodal.train")

CHECKER_SEED_BASE = 520_000
WIDTH = 16
KEEP_SHARES = (0.97, 0.98, 0.99, 0.995, 1.0)  # reported side by side from the same folds
FLIPS = True  # score each crop as the mean over its eight mirror images (classify.FLIP_DIMS)
CROP_KIND = "both"  # what the checker's crop shows (classify.CROP_KINDS; pipeline.checker_crops)


@dataclass(frozen=True)
class Part:
    """The candidates of one phantom."""

    seed: int  # the plain and the variety phantom of a seed share their anatomy: one fold
    crops: np.ndarray  # (n, channels, CROP, CROP, CROP) float16 (classify.CROP, crop_channels)
    axes_mm: np.ndarray  # (n, 2): short, long
    node: np.ndarray  # (n,) bool: matches a node of the phantom
    kept: np.ndarray  # (n,) bool: the model's verifier keeps it


def phantom_part(model, seed: int, variety: bool) -> Part:
    """Every candidate the model finds in training phantom `seed` (rules off)."""
    spec = phantoms.variety_spec(seed) if variety else training_spec(seed)
    ph = phantoms.generate(seed, spec)
    volume = phantom_volume(ph)
    pairs, _, image_w, grid = _detect(volume, model, PipelineSettings(plausibility=False))
    if not pairs:
        empty = np.zeros(0, bool)
        no_crops = np.zeros((0, crop_channels(CROP_KIND), 1, 1, 1), np.float16)
        return Part(seed, no_crops, np.zeros((0, 2)), empty, empty)
    kept = np.ones(len(pairs), bool)
    if model.verifier is not None:
        kept = model.verifier.keep(np.stack([candidate_features(volume, c, m) for c, m in pairs]))
    matches = match(ph.labels, [(m["bbox"], m["mask"]) for _, m in pairs], training=True)
    return Part(
        seed=seed,
        crops=np.stack(checker_crops(CROP_KIND, pairs, image_w, grid)).astype(np.float16),
        axes_mm=np.array([(m["short"].length_mm, m["long"].length_mm) for _, m in pairs]),
        node=np.array([mt.gt != 0 for mt in matches]),
        kept=np.asarray(kept, bool),
    )


def phantom_parts(
    model_dir: Path, cases: int, seed: int = CHECKER_SEED_BASE, cache_dir: Path | None = None
) -> list[Part]:
    """The parts of `cases` seeds, each as a plain and as a domain-randomised phantom,
    cached per phantom (keyed by the segmenter's and the verifier's checksums)."""
    if seed + cases > EVAL_SEED_BASE:
        raise ValueError(f"checker seeds must stay below the evaluation seeds ({EVAL_SEED_BASE})")
    model = load_model(model_dir, "cpu")
    weights = model.card["weights"]
    verifier_sha = weights.get("verifier", {}).get("sha256", "none")
    version = (
        "checker-1" if CROP_KIND == "candidate" else f"checker-1 {CROP_KIND}"
    )  # the candidate crop's cache stays
    basis = f"{weights['segmenter']['sha256']} {verifier_sha} {version}"
    key = hashlib.sha256(basis.encode()).hexdigest()[:16]
    parts = []
    for n in progress(range(cases), cases, "checker phantoms"):
        for variety in (False, True):
            name = f"checker-{key}{phantoms.revision_tag(variety)}-{seed + n}-{int(variety)}.npz"
            cached = cache_dir / name if cache_dir else None
            if cached is not None and cached.is_file():
                with np.load(cached) as z:
                    part = Part(seed + n, z["crops"], z["axes_mm"], z["node"], z["kept"])
            else:
                part = phantom_part(model, seed + n, variety)
                if cached is not None:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    np.savez(cached, crops=part.crops, axes_mm=part.axes_mm, node=part.node, kept=part.kept)
            parts.append(part)
    return parts


def fit(parts: list[Part], epochs: int, seed: int) -> torch.nn.Module:
    """A checker fitted on every candidate of `parts` (the classifier's training loop)."""
    crops = [c for p in parts for c in p.crops]
    axes = [tuple(a) for p in parts for a in p.axes_mm]
    labels = [bool(v) for p in parts for v in p.node]
    cfg = TrainConfig(seed=seed, cls_epochs=epochs, cls_width=WIDTH)
    return train_classifier(cfg, crops, axes, labels, name="checker")


def scores(net: torch.nn.Module, part: Part) -> np.ndarray:
    if len(part.node) == 0:
        return np.zeros(0)
    crops = [c.astype(np.float32) for c in part.crops]
    axes = [tuple(a) for a in part.axes_mm]
    return np.array(crop_probabilities(net, crops, axes, torch.device("cpu"), flips=FLIPS))


def out_of_fold(parts: list[Part], folds: int, epochs: int, seed: int) -> list[np.ndarray]:
    """Each part scored by a checker fitted on the other folds (a fold: the seeds equal
    modulo `folds`)."""
    out: list[np.ndarray] = [np.zeros(0)] * len(parts)
    for fold in range(folds):
        net = fit([p for p in parts if p.seed % folds != fold], epochs, seed + fold)
        for i, p in enumerate(parts):
            if p.seed % folds == fold:
                out[i] = scores(net, p)
    return out


def threshold_for(parts: list[Part], oof: list[np.ndarray], keep_share: float) -> float:
    """The score that keeps `keep_share` of the verifier's nodes out of fold."""
    node_scores = np.concatenate([s[p.node & p.kept] for p, s in zip(parts, oof, strict=True)])
    return float(np.quantile(node_scores, 1 - keep_share)) if keep_share < 1 else float(node_scores.min())


def out_of_fold_table(parts: list[Part], oof: list[np.ndarray]) -> list[dict]:
    """For each share in KEEP_SHARES: nodes lost and false positives removed among what the
    verifier keeps, out of fold."""
    rows = []
    for share in KEEP_SHARES:
        th = threshold_for(parts, oof, share)
        lost = sum(int((p.node & p.kept & (s < th)).sum()) for p, s in zip(parts, oof, strict=True))
        removed = sum(int((~p.node & p.kept & (s < th)).sum()) for p, s in zip(parts, oof, strict=True))
        rows.append(
            {
                "keep_share": share,
                "threshold": round(th, 4),
                "nodes_lost": lost,
                "false_positives_removed": removed,
            }
        )
    return rows


def train_checker(
    model_dir: Path,
    cases: int = 64,
    seed: int = CHECKER_SEED_BASE,
    keep_share: float = 0.99,
    epochs: int = 8,
    folds: int = 4,
    cache_dir: Path | None = None,
    command: str = "",
    version: str | None = None,
) -> dict:
    """Choose the threshold out of fold, fit on all phantoms, store; return the fit report."""
    parts = phantom_parts(model_dir, cases, seed, cache_dir)
    if not any(p.node.any() for p in parts) or all(p.node.all() for p in parts):
        raise ValueError("the checker needs both node and non-node candidates to learn from")
    oof = out_of_fold(parts, folds, epochs, seed)
    threshold = threshold_for(parts, oof, keep_share)
    net = fit(parts, epochs, seed + folds)
    report = {
        "phantoms": len(parts),
        "seeds": [seed, seed + cases - 1],
        "families": ["train", "train variety"],
        "candidates": int(sum(len(p.node) for p in parts)),
        "nodes": int(sum(p.node.sum() for p in parts)),
        "verifier_kept_nodes": int(sum((p.node & p.kept).sum() for p in parts)),
        "verifier_kept_others": int(sum((~p.node & p.kept).sum() for p in parts)),
        "epochs": epochs,
        "folds": folds,
        "keep_share": keep_share,
        "test_time_flips": FLIPS,
        "crop": CROP_KIND,
        "out_of_fold": out_of_fold_table(parts, oof),
        "segmenter_sha256": read_card(model_dir)["weights"]["segmenter"]["sha256"],
    }
    if command:
        report["command"] = command
    add_checker(model_dir, net, WIDTH, threshold, report, version, flips=FLIPS, crop=CROP_KIND)
    log.info(
        "checker threshold %.4f (keep share %g of the verifier's nodes, out of fold)", threshold, keep_share
    )
    return report
