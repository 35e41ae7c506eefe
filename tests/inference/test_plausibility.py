"""Plausibility rules: each rule rejects the look-alike it names and keeps a plain node."""

import numpy as np
import pytest

from inference import plausibility as P

SPACING = (1.0, 0.8, 0.8)


def _grid(shape=(40, 80, 80)):
    k, j, i = np.indices(shape, dtype=float)
    return k * SPACING[0], j * SPACING[1], i * SPACING[2]


def _judge(hu, mask_full, short_mm, long_mm, ends=None, rules=None):
    idx = np.argwhere(mask_full)
    lo, hi = idx.min(0), idx.max(0) + 1
    bbox = (*(int(v) for v in lo), *(int(v) for v in hi))
    mask = mask_full[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    key = int(lo[0] + np.argmax(mask.sum(axis=(1, 2))))
    return P.judge(hu, SPACING, mask, bbox, short_mm, long_mm, ends, key, rules or P.Rules())


def _ends_along_i(centre_ji, half_mm):
    j, i = centre_ji
    return ((j, i - half_mm / SPACING[2]), (j, i + half_mm / SPACING[2]))


def test_a_node_in_fat_breaks_no_rule():
    z, y, x = _grid()
    hu = np.full(z.shape, -100.0)
    node = ((z - 20) / 6) ** 2 + ((y - 32) / 5) ** 2 + ((x - 32) / 8) ** 2 <= 1
    hu[node] = 45.0
    verdict = _judge(hu, node, 10.0, 16.0, _ends_along_i((40, 40), 8))
    assert not any(verdict.values()), verdict


def test_a_vessel_cut_across_continues_above_and_below():
    z, y, x = _grid()
    hu = np.full(z.shape, -100.0)
    tube = ((y - 32) ** 2 + (x - 32) ** 2) <= 3.5**2
    hu[tube] = 42.0
    piece = tube & (z >= 15) & (z <= 24)
    verdict = _judge(hu, piece, 7.0, 7.0, _ends_along_i((40, 40), 3.5))
    assert verdict["tube_z"] and not verdict["tube_inplane"]


def test_a_vessel_in_plane_continues_beyond_its_long_axis():
    z, y, x = _grid()
    hu = np.full(z.shape, -100.0)
    tube = ((z - 20) ** 2 + (y - 32) ** 2) <= 3.5**2
    hu[tube] = 42.0
    piece = tube & (x >= 24) & (x <= 40)
    verdict = _judge(hu, piece, 7.0, 16.0, _ends_along_i((40, 40), 8))
    assert verdict["tube_inplane"] and not verdict["tube_z"]


def test_a_fluid_filled_bowel_loop_is_mostly_fluid():
    z, y, x = _grid((40, 100, 100))
    hu = np.full(z.shape, -100.0)
    r2 = (y - 40) ** 2 + (x - 40) ** 2
    loop = (r2 <= 22**2) & (np.abs(z - 20) <= 20)
    hu[loop] = 45.0
    hu[(r2 <= 19**2) & loop] = 8.0
    piece = loop & (np.abs(z - 20) <= 6)
    verdict = _judge(hu, piece, 44.0, 44.0)
    assert verdict["fluid"] and not verdict["size"]  # the fluid, not the size: nodes grow this big


def test_a_bulky_node_is_not_too_big():
    """A 45 mm solid node (a target that grew at follow-up, bulky lymphoma) breaks no size rule
    (the first limit was 40 mm)."""
    z, y, x = _grid((60, 100, 100))
    hu = np.full(z.shape, -100.0)
    node = ((y - 50) / 28.0) ** 2 + ((x - 50) / 28.0) ** 2 + ((z - 30) / 23.0) ** 2 <= 1  # 45 x 45 x 46 mm
    hu[node] = 40.0
    verdict = _judge(hu, node, 45.0, 46.0)
    assert not verdict["size"] and not P.implausible(verdict, P.Rules())
    assert _judge(hu, node, 101.0, 120.0)["size"]


def test_a_necrotic_node_is_not_fluid():
    z, y, x = _grid()
    hu = np.full(z.shape, -100.0)
    q = ((z - 20) / 11) ** 2 + ((y - 32) / 11) ** 2 + ((x - 32) / 11) ** 2
    hu[q <= 1] = 50.0
    hu[q <= 0.55**2] = 12.0
    verdict = _judge(hu, q <= 1, 22.0, 22.0)
    assert not verdict["fluid"]


def test_an_unenhanced_noisy_node_is_not_fluid():
    z, y, x = _grid((44, 100, 100))
    rng = np.random.default_rng(0)
    hu = np.full(z.shape, -100.0) + rng.normal(0, 15, z.shape)
    node = ((z - 21) / 12) ** 2 + ((y - 40) / 11) ** 2 + ((x - 40) / 11) ** 2 <= 1
    hu[node] = 28.0 + rng.normal(0, 15, node.sum())
    assert not _judge(hu, node, 22.0, 22.0)["fluid"]
    hu[node] = 8.0 + rng.normal(0, 15, node.sum())
    assert _judge(hu, node, 22.0, 22.0)["fluid"]


def test_gas_density_and_elongation_and_no_fat():
    z, y, x = _grid()
    hu = np.full(z.shape, -100.0)
    blob = ((z - 20) / 4) ** 2 + ((y - 32) / 4) ** 2 + ((x - 32) / 4) ** 2 <= 1
    hu[blob] = 40.0
    hu[19:22, 38:42, 38:42] = -900.0  # a gas bubble: about a tenth of the blob
    assert _judge(hu, blob, 8.0, 8.0)["gas"]
    hu[blob] = 250.0
    assert _judge(hu, blob, 8.0, 8.0)["density"]
    assert _judge(hu, blob, 4.0, 16.0)["elongation"]
    muscle = np.full(z.shape, 50.0)
    assert _judge(muscle, blob, 8.0, 8.0)["no_fat"]


def test_a_curving_tube_is_longer_than_any_node():
    """A bowel loop or vessel bending through the slices: on its key slice and straight
    above, below or along its long axis it looks bounded, but its path inside itself is
    many times its thickness."""
    z, y, x = _grid((50, 80, 80))
    hu = np.full(z.shape, -100.0)
    # a half ring in the z-x plane (arc radius 16 mm) of a tube 9 mm across
    ring = (np.hypot(z - 25, x - 32) - 16) ** 2 + (y - 32) ** 2 <= 4.5**2
    piece = ring & (z <= 25)
    hu[ring] = 40.0
    verdict = _judge(hu, piece, 9.0, 12.0, _ends_along_i((40, 40), 6))
    assert verdict["tube_path"]
    assert not verdict["elongation"]  # the key slice alone does not show it
    assert P.path_over_thickness(piece[piece.any(axis=(1, 2))], SPACING) > 4.0


def test_nodes_are_not_tubes_round_elongated_or_touching_one():
    z, y, x = _grid((50, 80, 80))
    hu = np.full(z.shape, -100.0)
    # long/short 3, the most the training family draws, 10 mm thick: a node
    oval = ((z - 25) / 6) ** 2 + ((y - 32) / 5) ** 2 + ((x - 32) / 15) ** 2 <= 1
    hu[oval] = 45.0
    assert P.path_over_thickness(oval, SPACING) < 3.6
    assert not _judge(hu, oval, 10.0, 30.0)["tube_path"]
    # a 14 mm node against a long straight vessel of its own density: the rule reads the
    # node's own shape, so the vessel it touches does not make it a tube
    hu = np.full(z.shape, -100.0)
    vessel = (y - 32) ** 2 + (x - 20) ** 2 <= 4.0**2
    node = (z - 25) ** 2 + (y - 32) ** 2 + (x - 31) ** 2 <= 7.0**2
    hu[vessel | node] = 42.0
    assert not _judge(hu, node, 14.0, 14.0)["tube_path"]
    # a straight piece of that vessel 50 mm long is a tube
    assert _judge(hu, vessel & (z >= 5) & (z <= 45), 8.0, 8.0)["tube_path"]


def test_a_large_candidate_is_measured_on_a_coarser_grid_alike():
    k, j, i = np.indices((120, 90, 90), dtype=float)
    sp = (0.6, 0.5, 0.5)
    tube = ((k * sp[0] - 36) ** 2 + (j * sp[1] - 22) ** 2 <= 9.0**2) & (i * sp[2] > 2) & (i * sp[2] < 43)
    fine = P.path_over_thickness(tube, sp, max_voxels=10**8)
    coarse = P.path_over_thickness(tube, sp, max_voxels=20000)
    assert 2.0 < fine < 3.0  # 41 mm over 18 mm (corner to corner: a little more)
    assert abs(coarse - fine) / fine < 0.1


def test_rules_round_trip_through_the_card_and_can_be_turned_off():
    rules = P.Rules(max_elongation=3.0, off=("tube_inplane",))
    card = rules.to_card()
    assert card["rules"]["tube_inplane"] is False and card["rules"]["fluid"] is True
    back = P.Rules.from_card(card)
    assert back == rules
    assert "tube_inplane" not in back.enabled()
    assert P.Rules.from_card(None) is None
    with pytest.raises(ValueError, match="unknown"):
        P.Rules.from_card({"rules": {"colour": True}})
    with pytest.raises(ValueError, match="unknown"):
        P.Rules.from_card({"thresholds": {"max_colour": 1}})
    older = {"rules": {r: True for r in P.RULES if r != "tube_path"}, "thresholds": {}}
    assert "tube_path" not in P.Rules.from_card(older).enabled()  # a card from before a rule
    verdict = dict.fromkeys(P.RULES, False) | {"tube_inplane": True}
    assert not P.implausible(verdict, back)
    assert P.implausible(verdict, P.Rules())


def test_the_card_carries_the_rules_and_the_pipeline_applies_them(tmp_path):
    import shutil
    from dataclasses import replace

    from inference import phantoms
    from inference.evaluate import phantom_volume
    from inference.model_store import DEFAULT_MODEL_DIR, load_model, set_plausibility
    from inference.pipeline import PipelineSettings, analyse

    model_dir = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, model_dir)
    strict = P.Rules(max_short_axis_mm=0.1)  # every candidate breaks `size`
    set_plausibility(model_dir, strict)
    model = load_model(model_dir, device="cpu")
    assert model.plausibility == strict
    spec = phantoms.PhantomSpec(rows=200, columns=200, pixel_spacing_mm=1.6, slices=40, slice_spacing_mm=3.0)
    volume = phantom_volume(phantoms.generate(11, spec))
    assert analyse(volume, model, PipelineSettings(plausibility=False)).findings.findings
    assert not analyse(volume, model).findings.findings
    set_plausibility(model_dir, replace(strict, off=("size",)))
    model = load_model(model_dir, device="cpu")
    assert analyse(volume, model).findings.findings
    set_plausibility(model_dir, None)
    assert load_model(model_dir, device="cpu").plausibility is None
