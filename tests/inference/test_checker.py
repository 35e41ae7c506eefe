"""The checker: a CNN on each candidate's crop (node or look-alike), its threshold chosen out
of fold, pinned in the card and applied by the pipeline."""

import json
import shutil

import numpy as np
import pytest
import torch
from scipy import ndimage

from inference import phantoms, rules
from inference.classify import CROP, crop_channels, crop_probabilities
from inference.evaluate import phantom_volume
from inference.model_store import DEFAULT_MODEL_DIR, ModelCardError, add_checker, load_model
from inference.networks import NodeClassifier
from inference.nodes import node_focus, working_crop
from inference.pipeline import _detect, analyse, checker_crops, checker_keeps, structure_crop
from inference.preprocess import to_working
from inference.train_checker import (
    KEEP_SHARES,
    Part,
    fit,
    out_of_fold,
    out_of_fold_table,
    scores,
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


def part(seed, node, kept, rng, n_crop=CROP, channels=2):
    n = len(node)
    crops = np.zeros((n, channels, n_crop, n_crop, n_crop), np.float16)
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


def test_a_checker_on_both_crops_is_fitted_and_scored_on_four_channels():
    """Both crops stacked (card `checker.crop` "both"): the network takes their four channels."""
    rng = np.random.default_rng(3)
    p = part(0, [True] * 8 + [False] * 8, [True] * 16, rng, n_crop=16, channels=crop_channels("both"))
    net = fit([p], epochs=1, seed=0)
    assert net.features[0][0].in_channels == 4
    assert scores(net, p).shape == (16,)


def test_the_checker_is_pinned_in_the_card_and_the_pipeline_applies_it(model_dir):
    spec = phantoms.PhantomSpec(rows=200, columns=200, pixel_spacing_mm=1.6, slices=40, slice_spacing_mm=3.0)
    volume = phantom_volume(phantoms.generate(11, spec))
    first = analyse(volume, load_model(model_dir, "cpu")).findings
    found = first.findings
    assert found
    # the card's limit (2.5 mm) reaches the results of this CT, whose slices are 3 mm apart
    assert first.model.max_slice_spacing_mm == 2.5
    assert first.remarks == (rules.thick_slices_remark(3.0, 2.5),)

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


def node_and_vessel(spacing=(2.0, 0.8, 0.8), shape=(40, 100, 100)):
    """A 12 mm ball with a 4 mm vessel leaving its top and running on along z: one
    candidate, as the segmenter can join a node to a vessel it touches; and the ball alone."""
    k, j, i = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(float)
    z, y, x = k * spacing[0], j * spacing[1], i * spacing[2]
    centre = np.array([30.0, 40.0, 40.0])  # mm
    ball = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= 6.0**2
    vessel = ((y - centre[1]) ** 2 + (x - centre[2] - 5.0) ** 2 <= 2.0**2) & (z >= centre[0] + 4) & (z <= 76)
    mask = ball | vessel
    hu = np.where(mask, 45.0, -100.0).astype(np.float32)
    return hu, mask, ball


def _box_of(mask):
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    return box, (*(s.start for s in box), *(s.stop for s in box))


def test_the_node_crop_shows_a_node_joined_to_a_vessel_as_a_lone_node():
    """The candidate's crop is centred on and scaled to the joined whole, where the node
    shrinks; the node crop (`node_focus`: its key slice's centre and its long axis) is the lone node's."""
    spacing = (2.0, 0.8, 0.8)
    hu, mask, ball = node_and_vessel(spacing)
    image_w, grid = to_working(hu, spacing, 1.0, crop=False)
    box, bbox = _box_of(mask)
    key = bbox[0] + int(np.argmax(mask[box].sum(axis=(1, 2))))
    focus = node_focus(mask[box], bbox, key, 12.0)
    np.testing.assert_allclose(focus[0], [15, 50, 50], atol=0.01)  # the ball's centre (native k, j, i)
    assert focus[1] == 12.0

    lone_box, lone_bbox = _box_of(ball)
    lone = working_crop(image_w, grid, ball[lone_box], lone_bbox)
    whole = working_crop(image_w, grid, mask[box], bbox)
    node = working_crop(image_w, grid, mask[box], bbox, focus=focus)
    c = CROP // 2
    assert (whole[1] > 0.5).sum() < 0.6 * (lone[1] > 0.5).sum()  # the whole shrinks to fit the cube
    assert node[1, c, c, c] > 0.5
    a, b = node[1] > 0.5, lone[1] > 0.5
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.9  # the node crop: the lone node's, vessel aside
    np.testing.assert_allclose(node[0][b], lone[0][b], atol=0.05)


@pytest.mark.parametrize("kind", ["candidate", "node", "both"])
def test_a_structure_found_outside_the_pipeline_is_cropped_and_checked_as_a_candidate(model_dir, kind):
    """A look's structure (its voxels in a box of the volume) gets the crop the pipeline
    makes for a candidate with the same voxels, of either kind, though only a patch of the
    working grid is resampled; the checker judges it by the card's threshold."""
    spec = phantoms.PhantomSpec(rows=200, columns=200, pixel_spacing_mm=1.6, slices=40, slice_spacing_mm=3.0)
    volume = phantom_volume(phantoms.generate(11, spec))
    model = load_model(model_dir, "cpu")
    pairs, _, image_w, grid = _detect(volume, model, None)
    assert len(pairs) >= 3
    pipeline_crops = checker_crops(kind, pairs, image_w, grid)
    for (c, m), pipeline_crop in zip(pairs, pipeline_crops, strict=True):
        assert pipeline_crop.shape[0] == crop_channels(kind)
        if kind != "node":  # the look's candidate crop: from its voxels
            whole = working_crop(image_w, grid, c.mask, c.bbox)
            pipeline_crop = np.concatenate([whole, pipeline_crop[2:]])
        crop = structure_crop(
            volume, c.mask, tuple(c.bbox[:3]), model.working_spacing, kind, m["long"].length_mm
        )
        np.testing.assert_allclose(crop, pipeline_crop, atol=1e-3)

    c, m = pairs[0]
    args = (volume, c.mask, tuple(c.bbox[:3]), m["short"].length_mm, m["long"].length_mm)
    assert checker_keeps(model, *args)  # no checker: kept
    torch.manual_seed(0)
    for threshold, kept in ((1.01, False), (0.0, True)):
        net = NodeClassifier(16, in_channels=crop_channels(kind)).eval()
        add_checker(model_dir, net, 16, threshold, {}, flips=True, crop=kind)
        assert checker_keeps(load_model(model_dir, "cpu"), *args) is kept


def test_the_cards_checker_crop_is_loaded_and_an_unknown_one_refused(model_dir):
    add_checker(model_dir, NodeClassifier(16), 16, 0.5, {}, crop="node")
    assert load_model(model_dir, "cpu").checker.crop == "node"
    card = json.loads((model_dir / "model_card.json").read_text())
    del card["checker"]["crop"]  # a card from before the choice: the candidate's crop
    (model_dir / "model_card.json").write_text(json.dumps(card))
    assert load_model(model_dir, "cpu").checker.crop == "candidate"
    card["checker"]["crop"] = "context"
    (model_dir / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ModelCardError, match=r"checker\.crop 'context'"):
        load_model(model_dir, "cpu")
    card["checker"]["crop"] = "both"  # weights on two channels under a crop of four
    (model_dir / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ModelCardError, match=r"on 4 channels \(checker\.crop 'both'\)"):
        load_model(model_dir, "cpu")
    add_checker(model_dir, NodeClassifier(16, in_channels=4), 16, 0.5, {}, crop="both")
    assert load_model(model_dir, "cpu").checker.crop == "both"


def test_nodal_checker_sets_the_threshold_and_lets_the_checker_judge_without_the_verifier(model_dir):
    """`nodal checker --threshold T --without-verifier`: the checker judges every candidate
    the segmenter finds; the verifier's file and card entry are gone; the fit's own
    threshold stays in `checker.fit`."""
    from dicom_node.cli import main
    from inference import verify
    from inference.model_store import add_verifier

    spec = phantoms.PhantomSpec(rows=200, columns=200, pixel_spacing_mm=1.6, slices=40, slice_spacing_mm=3.0)
    volume = phantom_volume(phantoms.generate(11, spec))
    x = np.random.default_rng(0).normal(size=(60, len(verify.FEATURES)))
    add_verifier(model_dir, verify.fit(x, x[:, 0] > 0, 0.9)[0], {"note": "a verifier to remove"})
    assert load_model(model_dir, "cpu").verifier is not None
    with_verifier = analyse(volume, load_model(model_dir, "cpu")).findings.findings
    assert main(["checker", "--model-dir", str(model_dir), "--threshold", "0.5"]) == 1  # no checker yet

    torch.manual_seed(0)
    add_checker(model_dir, NodeClassifier(16).eval(), 16, 1.01, {"threshold": 1.01})
    assert main(["checker", "--model-dir", str(model_dir), "--threshold", "1.5"]) == 1
    argv = ["checker", "--model-dir", str(model_dir), "--threshold", "1e-9", "--without-verifier"]
    assert main([*argv, "--version", "9.9.9"]) == 0
    card = json.loads((model_dir / "model_card.json").read_text())
    assert "verifier" not in card["weights"] and "verifier" not in card
    assert not (model_dir / "verifier.json").exists()
    assert card["checker"]["threshold"] == 1e-9 and card["checker"]["fit"] == {"threshold": 1.01}
    assert card["checker"]["set"]["command"].endswith("--threshold 1e-9 --without-verifier --version 9.9.9")
    model = load_model(model_dir, "cpu")
    assert model.verifier is None and model.version == "9.9.9"
    alone = analyse(volume, model)
    assert "verify" not in alone.seconds and "check" in alone.seconds
    assert len(alone.findings.findings) >= len(with_verifier)  # nothing is dropped at this threshold


def test_nodal_checker_from_takes_another_models_checker_with_its_card_entry(model_dir):
    """`nodal checker --from DIR`: a model whose segmenter was trained on keeps the checker of
    the model it came from, its weights checked and its fit recorded; refused when the
    source has no checker, its weights do not match its card, or it works on another grid."""
    from dicom_node.cli import main

    source = shutil.copytree(model_dir, model_dir.parent / "source")
    torch.manual_seed(3)
    add_checker(
        source, NodeClassifier(16, in_channels=4).eval(), 16, 0.3, {"cases": 7}, "1.2.3", True, "both"
    )
    assert main(["checker", "--model-dir", str(model_dir), "--from", str(model_dir.parent / "none")]) == 1
    assert main(["checker", "--model-dir", str(model_dir), "--from", str(model_dir)]) == 1  # no checker there

    argv = ["checker", "--model-dir", str(model_dir), "--from", str(source), "--threshold", "0.6"]
    assert main(argv) == 0
    card = json.loads((model_dir / "model_card.json").read_text())
    theirs = json.loads((source / "model_card.json").read_text())
    assert card["weights"]["checker"] == theirs["weights"]["checker"]
    assert (model_dir / "checker.pt").read_bytes() == (source / "checker.pt").read_bytes()
    assert card["checker"]["fit"] == {"cases": 7} and card["checker"]["crop"] == "both"
    assert card["checker"]["taken_from"] == {"name": theirs["name"], "version": "1.2.3"}
    assert card["checker"]["threshold"] == 0.6 and theirs["checker"]["threshold"] == 0.3
    assert (
        card["checker"]["set"]["command"]
        == f"nodal checker --model-dir {model_dir} --from {source} --threshold 0.6"
    )
    model = load_model(model_dir, "cpu")
    assert model.checker.threshold == 0.6 and model.checker.crop == "both" and model.checker.flips

    theirs["working_spacing_mm"] = 0.8
    (source / "model_card.json").write_text(json.dumps(theirs))
    assert main(["checker", "--model-dir", str(model_dir), "--from", str(source)]) == 1
    theirs["working_spacing_mm"] = card["working_spacing_mm"]
    (source / "model_card.json").write_text(json.dumps(theirs))
    (source / "checker.pt").write_bytes(b"changed")
    assert main(["checker", "--model-dir", str(model_dir), "--from", str(source)]) == 1
    assert load_model(model_dir, "cpu").checker.threshold == 0.6  # the refused calls changed nothing
