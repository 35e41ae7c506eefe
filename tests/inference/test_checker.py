"""The checker: a CNN on each candidate's crop (node or look-alike), its threshold chosen out
of fold, pinned in the card and applied by the pipeline."""

import json
import shutil

import numpy as np
import pytest
import torch

from inference import phantoms
from inference.classify import CROP, crop_probabilities
from inference.evaluate import phantom_volume
from inference.model_store import DEFAULT_MODEL_DIR, ModelCardError, add_checker, load_model
from inference.networks import NodeClassifier
from inference.nodes import working_crop
from inference.pipeline import _detect, analyse, checker_keeps, structure_crop
from inference.train_checker import (
    KEEP_SHARES,
    Part,
    fit,
    out_of_fold,
    out_of_fold_table,
    threshold_for,
)


@pytest.fixture
def model_dir(tmp_path):
    d = shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "m")
    card = json.loads((d / "model_card.json").read_text())
    card["weights"].pop("checker", None)
    card.pop("checker", None)
    (d / "checker.pt").unlink(missing_ok=True)
    (d / "model_card.json").write_text(json.dumps(card))
    return d


def part(seed, node, kept, rng, n_crop=CROP):
    n = len(node)
    crops = np.zeros((n, 2, n_crop, n_crop, n_crop), np.float16)
    c = n_crop // 2
    for i, is_node in enumerate(node):  # a node: a bright ball in the mask channel; else a bar
        if is_node:
            crops[i, 1, c - 4 : c + 4, c - 4 : c + 4, c - 4 : c + 4] = 1
        else:
            crops[i, 1, :, c - 2 : c + 2, c - 2 : c + 2] = 1
        crops[i, 0] = rng.normal(0, 0.1, (n_crop,) * 3)
    axes = np.array([(8.0, 9.0) if v else (6.0, 30.0) for v in node])
    return Part(seed, crops, axes, np.asarray(node, bool), np.asarray(kept, bool))


def test_threshold_keeps_the_asked_share_of_the_verifiers_nodes():
    rng = np.random.default_rng(0)
    parts = [part(s, [True] * 50 + [False] * 50, [True] * 100, rng) for s in range(2)]
    oof = [np.r_[np.linspace(0.5, 1.0, 50), np.linspace(0.0, 0.6, 50)] for _ in parts]
    assert threshold_for(parts, oof, 1.0) == 0.5
    th = threshold_for(parts, oof, 0.9)
    kept = np.concatenate([s[p.node] for p, s in zip(parts, oof, strict=True)]) >= th
    assert kept.mean() == pytest.approx(0.9, abs=0.02)
    rows = out_of_fold_table(parts, oof)
    assert [r["keep_share"] for r in rows] == list(KEEP_SHARES)
    assert rows[-1]["nodes_lost"] == 0
    assert rows[-1]["false_positives_removed"] == 2 * int((np.linspace(0.0, 0.6, 50) < 0.5).sum())


def test_a_node_the_verifier_drops_does_not_set_the_threshold():
    rng = np.random.default_rng(1)
    p = part(0, [True, True, False], [True, False, True], rng)
    assert threshold_for([p], [np.array([0.9, 0.1, 0.2])], 1.0) == 0.9


def test_fit_learns_a_ball_from_a_bar_out_of_fold():
    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    parts = [part(s, [True] * 16 + [False] * 16, [True] * 32, rng) for s in range(4)]
    oof = out_of_fold(parts, folds=2, epochs=10, seed=3)
    nodes = np.concatenate([s[p.node] for p, s in zip(parts, oof, strict=True)])
    others = np.concatenate([s[~p.node] for p, s in zip(parts, oof, strict=True)])
    assert nodes.min() > others.max()
    assert isinstance(fit(parts, epochs=1, seed=0), NodeClassifier)


def test_the_checker_is_pinned_in_the_card_and_the_pipeline_applies_it(model_dir):
    spec = phantoms.PhantomSpec(rows=200, columns=200, pixel_spacing_mm=1.6, slices=40, slice_spacing_mm=3.0)
    volume = phantom_volume(phantoms.generate(11, spec))
    found = analyse(volume, load_model(model_dir, "cpu")).findings.findings
    assert found

    torch.manual_seed(0)
    net = NodeClassifier(16).eval()
    add_checker(model_dir, net, 16, 1.01, {"note": "drops every candidate"})
    model = load_model(model_dir, "cpu")
    assert model.checker is not None and model.checker.threshold == 1.01 and not model.checker.flips
    card = json.loads((model_dir / "model_card.json").read_text())
    assert card["checker"]["fit"] == {"note": "drops every candidate"}
    assert card["weights"]["checker"]["sha256"]
    assert not analyse(volume, model).findings.findings

    add_checker(model_dir, net, 16, 0.0, {}, version="9.9.9", flips=True)
    model = load_model(model_dir, "cpu")
    assert model.version == "9.9.9" and model.checker is not None and model.checker.flips
    analysis = analyse(volume, model)
    assert [f.label for f in analysis.findings.findings] == [f.label for f in found]
    assert "check" in analysis.seconds

    with open(model_dir / "checker.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelCardError, match=r"checksum of checker\.pt"):
        load_model(model_dir, "cpu")


def test_a_card_without_the_checkers_threshold_is_refused(model_dir):
    add_checker(model_dir, NodeClassifier(16), 16, 0.5, {})
    card = json.loads((model_dir / "model_card.json").read_text())
    del card["checker"]["threshold"]
    (model_dir / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ModelCardError, match=r"checker\.threshold"):
        load_model(model_dir, "cpu")


def test_flip_scoring_averages_the_logit_over_the_eight_mirror_images():
    torch.manual_seed(0)
    net = NodeClassifier(8).eval()
    rng = np.random.default_rng(3)
    crop = rng.normal(0, 1, (2, CROP, CROP, CROP)).astype(np.float32)
    axes = (7.0, 12.0)
    cpu = torch.device("cpu")
    mirrors = [crop[:, ::a, ::b, ::c].copy() for a in (1, -1) for b in (1, -1) for c in (1, -1)]
    logits = [np.log(p / (1 - p)) for p in crop_probabilities(net, mirrors, [axes] * 8, cpu)]
    assert np.ptp(logits) > 1e-3  # the mirror images differ to the network
    expected = 1 / (1 + np.exp(-np.mean(logits)))
    assert crop_probabilities(net, [crop], [axes], cpu, flips=True)[0] == pytest.approx(expected, rel=1e-4)
    assert crop_probabilities(net, [crop], [axes], cpu)[0] == pytest.approx(
        1 / (1 + np.exp(-logits[0])), rel=1e-4
    )
    mirrored = crop_probabilities(net, mirrors[:1] + mirrors[-1:], [axes] * 2, cpu, flips=True)
    assert mirrored[0] == pytest.approx(mirrored[1], rel=1e-4)  # a mirror image scores the same


def test_a_structure_found_outside_the_pipeline_is_cropped_and_checked_as_a_candidate(model_dir):
    """A look's structure (its voxels in a box of the volume) gets the crop the pipeline
    makes for a candidate with the same voxels, though only a patch of the working grid is
    resampled; the checker judges it by the card's threshold."""
    spec = phantoms.PhantomSpec(rows=200, columns=200, pixel_spacing_mm=1.6, slices=40, slice_spacing_mm=3.0)
    volume = phantom_volume(phantoms.generate(11, spec))
    model = load_model(model_dir, "cpu")
    pairs, _, image_w, grid = _detect(volume, model, None)
    assert len(pairs) >= 3
    for c, _ in pairs:
        pipeline_crop = working_crop(image_w, grid, c.mask, c.bbox)
        crop = structure_crop(volume, c.mask, tuple(c.bbox[:3]), model.working_spacing)
        np.testing.assert_allclose(crop, pipeline_crop, atol=1e-3)

    c, m = pairs[0]
    args = (volume, c.mask, tuple(c.bbox[:3]), m["short"].length_mm, m["long"].length_mm)
    assert checker_keeps(model, *args)  # no checker: kept
    torch.manual_seed(0)
    for threshold, kept in ((1.01, False), (0.0, True)):
        add_checker(model_dir, NodeClassifier(16).eval(), 16, threshold, {}, flips=True)
        assert checker_keeps(load_model(model_dir, "cpu"), *args) is kept
