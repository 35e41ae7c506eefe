"""Candidate verification: features, the logistic fit, storage beside the weights."""

import json
import shutil

import numpy as np
import pytest
from scipy import ndimage

from inference import verify
from inference.model_store import DEFAULT_MODEL_DIR, ModelCardError, add_verifier, load_model


def sphere(n=21, r=8.0):
    k, j, i = np.mgrid[:n, :n, :n] - n // 2
    return (k**2 + j**2 + i**2) <= r**2


def test_features_of_a_sphere_and_of_a_tube():
    spacing = (1.0, 1.0, 1.0)
    ball = sphere()
    hu = np.where(ball, 40.0, -100.0)
    soft = np.where(ball, 0.9, 0.1)
    f = dict(zip(verify.FEATURES, verify.features(ball, hu, soft, spacing, 16.0, 16.0), strict=True))
    assert f["z_extent_over_short_axis"] == pytest.approx(17 / 16)
    assert f["fill_of_bounding_ellipsoid"] == pytest.approx(ball.sum() / (np.pi / 6 * 16 * 16 * 17), rel=1e-6)
    assert f["mean_hu"] == 40.0 and f["std_hu"] == 0.0 and f["share_above_100_hu"] == 0.0
    assert f["mean_probability"] == pytest.approx(0.9) and f["short_long_ratio"] == 1.0

    tube = np.zeros((40, 9, 9), bool)
    tube[:, 2:7, 2:7] = True  # a vessel along the table axis
    t = dict(
        zip(
            verify.FEATURES,
            verify.features(tube, np.full(tube.shape, 200.0), np.full(tube.shape, 0.6), spacing, 5.0, 5.0),
            strict=True,
        )
    )
    assert t["z_extent_over_short_axis"] == 8.0 and t["share_above_100_hu"] == 1.0


def synthetic(n, rng):
    """Nodes: round, 30-60 HU; non-nodes: elongated, contrast-bright."""
    y = rng.random(n) < 0.4
    x = rng.normal(size=(n, len(verify.FEATURES)))
    x[:, 4] += np.where(y, 1.0, 4.0)  # z extent / short axis
    x[:, 8] += np.where(y, 0.0, 2.0)  # share above 100 HU
    return x, y


def test_fit_keeps_the_asked_share_of_nodes_and_removes_most_others():
    rng = np.random.default_rng(0)
    x, y = synthetic(2000, rng)
    v, report = verify.fit(x, y, keep_share=0.98)
    assert report["nodes_kept"] >= 0.979 and report["non_nodes_removed"] > 0.9
    xt, yt = synthetic(2000, np.random.default_rng(1))
    kept = v.keep(xt)
    assert kept[yt].mean() > 0.95 and (~kept[~yt]).mean() > 0.9


def test_fit_needs_both_kinds():
    with pytest.raises(ValueError, match="both node and non-node"):
        verify.fit(np.zeros((5, len(verify.FEATURES))), np.ones(5, bool))


def test_stored_verifier_is_pinned_in_the_card_and_loaded(tmp_path):
    model_dir = shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "m")
    for name in ("verifier.json",):
        (model_dir / name).unlink(missing_ok=True)
    card = json.loads((model_dir / "model_card.json").read_text())
    card["weights"].pop("verifier", None)
    (model_dir / "model_card.json").write_text(json.dumps(card))
    x, y = synthetic(500, np.random.default_rng(2))
    v, report = verify.fit(x, y)
    add_verifier(model_dir, v, report)
    loaded = load_model(model_dir, "cpu").verifier
    assert loaded is not None and np.allclose(loaded.scores(x), v.scores(x))
    assert json.loads((model_dir / "model_card.json").read_text())["verifier"]["fit"]["nodes"] == int(y.sum())

    body = json.loads((model_dir / "verifier.json").read_text())
    body["threshold"] = 0.0  # tampering is caught by the checksum
    (model_dir / "verifier.json").write_text(json.dumps(body))
    with pytest.raises(ModelCardError, match=r"checksum of verifier\.json"):
        load_model(model_dir, "cpu")


def test_features_of_another_version_are_refused(tmp_path):
    x, y = synthetic(200, np.random.default_rng(3))
    v, _ = verify.fit(x, y)
    path = v.save(tmp_path)
    body = json.loads(path.read_text())
    body["features"] = body["features"][:-1]
    path.write_text(json.dumps(body))
    with pytest.raises(ValueError, match="differ from this version"):
        verify.Verifier.load(path)


def test_shell_tells_a_node_in_fat_from_a_lump_in_muscle():
    spacing = (2.0, 0.8, 0.8)
    n = 31
    k, j, i = np.mgrid[:n, :n, :n].astype(float)
    ball = ((k - 15) * 2.0) ** 2 + ((j - 15) * 0.8) ** 2 + ((i - 15) * 0.8) ** 2 <= 6.0**2
    [sl] = ndimage.find_objects(ball.astype(int))
    mask = ball[sl]
    offset = tuple(s.start for s in sl)
    soft = np.where(mask, 0.9, 0.1)
    names = list(verify.FEATURES)
    for around, fat_share, similar in ((-100.0, 1.0, 0.0), (50.0, 0.0, 1.0)):
        image = np.where(ball, 40.0, around)
        f = verify.features(mask, image[sl], soft, spacing, 12.0, 12.0, hu_around=image, offset=offset)
        assert f[names.index("shell_share_fat")] == fat_share
        assert f[names.index("shell_share_similar")] == similar
        assert f[names.index("shell_mean_hu")] == around


def test_cross_validation_trades_false_positives_for_kept_nodes():
    from inference.train_verifier import cross_validate

    rng = np.random.default_rng(4)
    parts = [synthetic(60, rng) for _ in range(8)]
    loose, strict = cross_validate(parts, (0.99, 0.8))
    assert loose["keep_share"] == 0.99 and strict["keep_share"] == 0.8
    assert loose["nodes_kept"] >= strict["nodes_kept"] and loose["fp_per_phantom"] >= strict["fp_per_phantom"]
    assert 0.7 <= strict["nodes_kept"] <= 0.9


def test_mixed_parts_take_a_plain_and_a_varied_phantom_from_each_seed(tmp_path):
    """`train-verifier --mixed`: both phantoms of each seed, in turn, each from its own cache entry."""
    from inference.train_verifier import VERIFIER_SEED_BASE, cache_file, mixed_parts

    model = load_model(device="cpu")
    for n in range(2):
        for variety in (False, True):
            x = np.full((3, len(verify.FEATURES)), 10 * n + variety, float)
            np.savez(
                cache_file(tmp_path, model, VERIFIER_SEED_BASE + n, variety), x=x, y=np.array([1, 0, 0], bool)
            )
    parts = mixed_parts(None, 2, cache_dir=tmp_path)
    assert [int(x[0, 0]) for x, _ in parts] == [0, 1, 10, 11]
    assert cache_file(tmp_path, model, 1, True) != cache_file(tmp_path, model, 1, False)
