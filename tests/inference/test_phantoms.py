"""The phantom generator: reproducible, labelled by its documented rule, hard for a threshold."""

import json
from dataclasses import replace

import numpy as np
import pytest

from inference import phantoms
from inference.dicom_volume import load_series

SMALL = phantoms.PhantomSpec(rows=256, columns=256, pixel_spacing_mm=1.45, slices=48, slice_spacing_mm=2.5)


@pytest.fixture(scope="module")
def ph():
    return phantoms.generate(7, SMALL)


def test_same_seed_same_phantom(ph):
    again = phantoms.generate(7, SMALL)
    assert np.array_equal(ph.hu, again.hu)
    assert ph.ground_truth() == again.ground_truth()
    assert not np.array_equal(ph.hu, phantoms.generate(8, SMALL).hu)


def test_nodes_have_known_size_and_sit_in_fat(ph):
    assert ph.nodes
    voxel = SMALL.pixel_spacing_mm**2 * SMALL.slice_spacing_mm
    for n in ph.nodes:
        assert 4.0 <= n.short_axis_mm <= 35.0
        assert n.short_axis_mm <= n.long_axis_mm
        assert n.short_axis_mm == pytest.approx(2 * n.semi_axes_mm[1], abs=0.01)
        voxels = (ph.labels == n.index).sum()
        assert voxels * voxel == pytest.approx(n.volume_mm3, rel=0.35 if n.short_axis_mm < 8 else 0.12)
        assert n.station in phantoms.STATIONS


def test_labels_follow_the_documented_criterion():
    tiny = phantoms.PhantomSpec(rows=160, columns=160, pixel_spacing_mm=2.3, slices=40, slice_spacing_mm=3.0)
    nodes = [n for seed in range(10) for n in phantoms.generate(seed, tiny).nodes]
    for n in nodes:
        assert n.score == phantoms.criterion_score(n.short_axis_mm, n.round, n.necrosis, n.fatty_hilum)
        assert n.malignant_criterion == (n.score >= 2)
        assert n.round == (n.short_axis_mm / n.long_axis_mm >= 0.8)
        if n.necrosis:
            assert n.short_axis_mm >= 8
    # both classes occur, and some labels were flipped by the label noise only rarely
    assert any(n.malignant_criterion for n in nodes) and not all(n.malignant_criterion for n in nodes)
    flipped = sum(n.malignant != n.malignant_criterion for n in nodes)
    assert flipped <= 0.2 * len(nodes)


def test_distractors_have_node_like_density():
    """Unenhanced vessels, muscle and bowel walls overlap the nodes' HU range."""
    ph = phantoms.generate(3, replace(SMALL, phase="unenhanced"))
    node_hu = ph.hu[ph.labels > 0]
    lo, hi = np.percentile(node_hu, [25, 75])
    for code in (phantoms.VESSEL, phantoms.MUSCLE):
        hu = ph.hu[ph.tissue == code]
        assert ((hu >= lo) & (hu <= hi)).mean() > 0.2, code


def test_written_series_loads_back(tmp_path, ph):
    paths = phantoms.write_phantom(ph, tmp_path)
    assert len(paths) == SMALL.slices
    vol = load_series(tmp_path)
    assert np.array_equal(vol.array, ph.hu.astype(np.float32))
    assert np.allclose(vol.affine, ph.affine, atol=1e-4)
    truth = json.loads((tmp_path / "ground_truth.json").read_text())
    assert len(truth["nodes"]) == len(ph.nodes)
    assert "criterion" in truth


def _canvas(fat_slab_gap_mm: tuple[float, float]) -> phantoms._Canvas:
    """A 1 mm canvas of fat with a band of muscle across x in `fat_slab_gap_mm`."""
    spec = phantoms.PhantomSpec(rows=40, columns=120, pixel_spacing_mm=1.0, slices=40, slice_spacing_mm=1.0)
    affine = np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1.0]])
    cv = phantoms._Canvas(spec, affine)
    cv.hu[:], cv.tissue[:] = -100.0, phantoms.FAT
    lo, hi = fat_slab_gap_mm
    cv.hu[:, :, int(lo) : int(hi)], cv.tissue[:, :, int(lo) : int(hi)] = 50.0, phantoms.MUSCLE
    return cv


def test_a_tube_clipped_to_its_region_leaves_no_short_piece():
    """A vessel that crosses a muscle band is painted in the fat on both sides; the piece
    left between the band and the end of its path, shorter than 3 diameters, would be a
    node-shaped blob of vessel in fat, and is not painted (revision 2)."""
    cv = _canvas((30, 90))  # fat at x 0-29 and 90-119
    cv.tube([(20, 20, 2), (20, 20, 98)], 3.0, 40.0, phantoms.VESSEL, where=(phantoms.FAT,))
    xs = np.flatnonzero((cv.tissue == phantoms.VESSEL).any(axis=(0, 1)))
    assert xs.min() == 0 and xs.max() < 30  # the long piece (cut by the edge) stays
    assert not (cv.tissue[:, :, 90:] == phantoms.VESSEL).any()  # the 8 mm piece (< 18 mm) is gone
    assert (cv.hu[:, :, 90:] == -100.0).all()  # ... and its fat is as before


def test_a_tube_piece_of_three_diameters_stays():
    cv = _canvas((30, 60))
    cv.tube([(20, 20, 2), (20, 20, 85)], 3.0, 40.0, phantoms.VESSEL, where=(phantoms.FAT,))
    assert (cv.tissue[:, :, 60:90] == phantoms.VESSEL).any(axis=(0, 1)).sum() >= 25  # 26-28 mm: a tube


def test_a_tube_within_its_own_tissue_is_painted_whole():
    """Bowel contents painted inside the bowel wall (`where` = its own code) are not pieces."""
    cv = _canvas((30, 90))
    cv.tube([(20, 20, 2), (20, 20, 98)], 3.0, 40.0, phantoms.MUSCLE, where=(phantoms.MUSCLE,))
    assert (cv.hu[:, :, 30:90] == 40.0).any()


def test_no_phantom_has_node_shaped_pieces_of_bowel_in_fat():
    """Bowel loops (and mesenteric vessels) are continuous: no isolated piece of bowel shorter
    than 3 of its diameters sits in the abdomen, away from the volume's edge."""
    from scipy import ndimage

    spec = replace(SMALL, region="abdomen")
    for seed in (0, 1, 2):
        ph = phantoms.generate(seed, spec)
        pieces, _ = ndimage.label(ph.tissue == phantoms.BOWEL)
        for piece in ndimage.find_objects(pieces):
            at_edge = any(s.start == 0 or s.stop == n for s, n in zip(piece, ph.tissue.shape, strict=True))
            extent = max((s.stop - s.start) * d for s, d in zip(piece, (2.5, 1.45, 1.45), strict=True))
            assert at_edge or extent >= 3 * 2 * 7.0, (seed, piece)  # bowel radius >= 7 mm


def test_the_pulmonary_artery_runs_on_into_the_lung():
    """Beyond the hilum the artery divides into lobar arteries that taper into the lung
    (revision 3): its end is no blind, rounded cap of 24 mm at blood density."""
    from scipy import ndimage

    spec = phantoms.PhantomSpec(rows=200, columns=200, pixel_spacing_mm=1.0, slices=200, slice_spacing_mm=1.0)
    affine = np.array([[0, 0, 1.0, -100], [0, 1.0, 0, -100], [1.0, 0, 0, 0], [0, 0, 0, 1.0]])
    cv = phantoms._Canvas(spec, affine)  # 1 mm voxels; index (k, j, i) = (z, y + 100, x + 100) mm
    cv.hu[:], cv.tissue[:] = -850.0, phantoms.LUNG
    cv.ellipsoid((150, 7, 33), (6, 6, 6), 45.0, phantoms.NODE)  # a node against the upper lobe's artery
    node = cv.tissue == phantoms.NODE
    hilum = np.array([100.0, 0.0, 0.0])
    phantoms._lobar_arteries(cv, hilum, 40.0)
    assert np.array_equal(cv.tissue == phantoms.NODE, node)  # never painted over a node
    vessel = cv.tissue == phantoms.VESSEL
    offset = np.array([0.0, 100.0, 100.0])  # mm -> index
    k, _, i = np.argwhere(vessel).T
    assert i.max() >= 150 and k.max() >= 170 and k.min() <= 30  # lateral, up and down into the lung
    assert ndimage.label(vessel)[1] == 1  # one tree, from the hilum
    radius = ndimage.distance_transform_edt(vessel)
    step, _ = phantoms.INTERLOBAR_ARTERY
    root = hilum + step
    for chain in phantoms.LOBAR_ARTERIES:  # each tip thin (2 mm radius), not a blunt end of 24 mm
        steps = np.array([s for s, _ in chain])
        tip = root + steps.sum(axis=0) - 0.5 * steps[-1]
        assert 1.0 <= radius[tuple(np.round(tip + offset).astype(int))] <= 2.5


def test_the_lobar_arteries_move_no_node_and_draw_no_random_number(monkeypatch):
    """Painted after the nodes, they change a phantom only around the hilum."""
    spec = replace(SMALL, region="chest")
    with_them = phantoms.generate(3, spec)
    monkeypatch.setattr(phantoms, "_lobar_arteries", lambda cv, hilum, hu: None)
    without = phantoms.generate(3, spec)
    assert np.array_equal(with_them.labels, without.labels)
    assert with_them.ground_truth() == without.ground_truth()
    added = (with_them.tissue == phantoms.VESSEL) & (without.tissue != phantoms.VESSEL)
    assert added.sum() > 0
    assert np.isin(without.tissue[added], (phantoms.LUNG, phantoms.FAT_MEDIASTINUM)).all()
    box = np.argwhere(added)
    lo, hi = box.min(axis=0) - 3, box.max(axis=0) + 4  # the partial-volume blur's reach
    outside = np.ones(added.shape, bool)
    outside[tuple(slice(max(a, 0), b) for a, b in zip(lo, hi, strict=True))] = False
    assert np.array_equal(with_them.hu[outside], without.hu[outside])


def test_cache_keys_name_the_generator_revision():
    # revision 4 changed only the domain-randomised phantoms: the plain ones' caches stay
    assert phantoms.REVISION == 4 and phantoms.revision_tag(True) == "-r4"
    assert phantoms.revision(False) == 3 and phantoms.revision_tag(False) == "-r3"
