"""Fit the candidate verifier (inference.verify) of a trained model on training phantoms.

The model's own segmenter runs on phantoms with training seeds (`VERIFIER_SEED_BASE` up:
apart from the segmenter's seeds and far below the evaluation seeds); each measured
candidate is labelled node or not by its overlap with the phantom's ground truth (the
same matching `nodal evaluate` uses), and the logistic verifier is fitted on them. Per-
phantom features are cached (keyed by the segmenter's checksum), so a refit is cheap.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from inference import phantoms, verify
from inference.datasets import SiteCase, open_dataset
from inference.evaluate import match, phantom_volume
from inference.model_store import LoadedModel, add_verifier, load_model
from inference.pipeline import PipelineSettings, candidate_features, detect
from inference.progress import progress
from inference.train import EVAL_SEED_BASE, training_spec
from inference.volume import Volume

log = logging.getLogger("nodal.train")

VERIFIER_SEED_BASE = 500_000


def labelled_candidates(
    model: LoadedModel, volume: Volume, labels: np.ndarray, settings: PipelineSettings
) -> tuple:
    """Features of the candidates found in `volume`, each labelled by overlap with the node
    instance map `labels` (same grid; 0 = no node)."""
    pairs, _ = detect(volume, model, settings)
    if not pairs:
        return np.zeros((0, len(verify.FEATURES))), np.zeros(0, bool)
    x = np.stack([candidate_features(volume, c, m) for c, m in pairs])
    matches = match(labels, [(m["bbox"], m["mask"]) for _, m in pairs], training=True)
    return x, np.array([m.gt != 0 for m in matches])


def phantom_candidates(
    model: LoadedModel, seed: int, settings: PipelineSettings, variety: bool = False
) -> tuple:
    ph = phantoms.generate(seed, phantoms.variety_spec(seed) if variety else training_spec(seed))
    return labelled_candidates(model, phantom_volume(ph), ph.labels, settings)


def site_candidates(model: LoadedModel, case: SiteCase, settings: PipelineSettings) -> tuple:
    """A site case (see docs/training.md) kept apart from the segmenter's training cases."""
    nodes, _ = ndimage.label(case.label > 0)
    return labelled_candidates(model, case.as_volume(), nodes, settings)


def train_verifier_on_site(model_dir: Path, data_dir: Path, keep_share: float = 0.98) -> dict | None:
    """Fit on the verifier cases of the dataset in `data_dir` (cases.json's
    `verifier_cases`); None when it has none."""
    cases = open_dataset(Path(data_dir)).split("verifier")
    if not cases:
        return None
    model = load_model(model_dir)
    settings = PipelineSettings()
    parts = [site_candidates(model, ref.load(), settings) for ref in cases]
    return _fit_and_store(model_dir, parts, keep_share, {"site_cases": len(cases)})


def train_verifier(
    model_dir: Path,
    cases: int = 24,
    seed: int = VERIFIER_SEED_BASE,
    keep_share: float = 0.98,
    cache_dir: Path | None = None,
    settings: PipelineSettings | None = None,
    command: str = "",
    variety: bool = False,
    mixed: bool = False,
) -> dict:
    """Fit and store the verifier of the model in `model_dir` on phantoms; return the fit report.

    `variety`: domain-randomised phantoms instead of plain ones; `mixed`: both, a plain and
    a domain-randomised phantom from each seed (as the checker is fitted)."""
    parts = training_parts(model_dir, cases, seed, cache_dir, settings, variety, mixed)
    source = {
        "phantoms": cases * (2 if mixed else 1),
        "seeds": [seed, seed + cases - 1],
        "variety": "mixed" if mixed else variety,
    }
    if command:
        source["command"] = command
    return _fit_and_store(model_dir, parts, keep_share, source)


def training_parts(
    model_dir: Path,
    cases: int,
    seed: int = VERIFIER_SEED_BASE,
    cache_dir: Path | None = None,
    settings: PipelineSettings | None = None,
    variety: bool = False,
    mixed: bool = False,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The candidates a verifier is fitted (or cross-validated) on: plain phantoms,
    domain-randomised ones (`variety`), or both phantoms of each seed (`mixed`)."""
    if mixed:
        return mixed_parts(model_dir, cases, seed, cache_dir, settings)
    return phantom_parts(model_dir, cases, seed, cache_dir, settings, variety)


def phantom_parts(
    model_dir: Path,
    cases: int,
    seed: int = VERIFIER_SEED_BASE,
    cache_dir: Path | None = None,
    settings: PipelineSettings | None = None,
    variety: bool = False,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(features, is node) of the candidates in each training phantom, cached per phantom."""
    if seed + cases > EVAL_SEED_BASE:
        raise ValueError(f"verifier seeds must stay below the evaluation seeds ({EVAL_SEED_BASE})")
    model = load_model(model_dir)
    settings = settings or PipelineSettings()
    parts = []
    for n in progress(range(cases), cases, "verifier phantoms"):
        cached = cache_file(cache_dir, model, seed + n, variety) if cache_dir else None
        if cached is not None and cached.is_file():
            with np.load(cached) as z:
                x, y = z["x"], z["y"]
        else:
            t = time.perf_counter()
            x, y = phantom_candidates(model, seed + n, settings, variety)
            log.info(
                "verifier phantom %d/%d: %d candidate(s), %d node(s), %.0f s",
                n + 1,
                cases,
                len(y),
                int(y.sum()),
                time.perf_counter() - t,
            )
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                np.savez(cached, x=x, y=y)
        parts.append((x, y))
    return parts


def cache_file(cache_dir: Path, model: LoadedModel, seed: int, variety: bool) -> Path:
    """Where the candidates of one phantom are cached: keyed by the segmenter's checksum and
    the verifier's feature names, so that another segmenter or feature set never reads them."""
    features_key = hashlib.sha256(" ".join(verify.FEATURES).encode()).hexdigest()[:8]
    segmenter = model.card["weights"]["segmenter"]["sha256"][:16]
    key = f"{segmenter}-{features_key}" + ("-variety" if variety else "") + phantoms.revision_tag(variety)
    return Path(cache_dir) / f"verifier-{key}-{seed}.npz"


def mixed_parts(
    model_dir: Path,
    cases: int,
    seed: int = VERIFIER_SEED_BASE,
    cache_dir: Path | None = None,
    settings: PipelineSettings | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`phantom_parts` of the plain and the domain-randomised phantom of each seed, in turn."""
    plain = phantom_parts(model_dir, cases, seed, cache_dir, settings, variety=False)
    varied = phantom_parts(model_dir, cases, seed, cache_dir, settings, variety=True)
    return [part for pair in zip(plain, varied, strict=True) for part in pair]


def cross_validate(parts: list[tuple], keep_shares: tuple[float, ...], folds: int = 4) -> list[dict]:
    """False positives per phantom and share of nodes kept when each fold of phantoms is
    scored by a verifier fitted on the others: what one keep share costs in the other."""
    out = []
    for share in keep_shares:
        fps, kept = [], []
        for fold in range(folds):
            train = [p for i, p in enumerate(parts) if i % folds != fold]
            x_train = np.concatenate([p[0] for p in train])
            v, _ = verify.fit(x_train, np.concatenate([p[1] for p in train]), share)
            for x, y in (p for i, p in enumerate(parts) if i % folds == fold):
                k = v.keep(x) if len(x) else np.zeros(0, bool)
                fps.append(int((k & ~y).sum()))
                kept.extend(k[y])
        fp_mean, kept_share = round(float(np.mean(fps)), 2), round(float(np.mean(kept)), 3)
        out.append({"keep_share": share, "fp_per_phantom": fp_mean, "nodes_kept": kept_share})
    return out


def _fit_and_store(model_dir: Path, parts: list[tuple], keep_share: float, source: dict) -> dict:
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    verifier, report = verify.fit(x, y, keep_share=keep_share)
    report |= source
    add_verifier(model_dir, verifier, report)
    return report
