"""Domain randomisation of the training family (`PhantomSpec.variety`): off by default and
then byte-identical to the phantoms before it existed; on, it adds what it documents."""

import hashlib
from dataclasses import replace

import numpy as np
import pytest

from inference import phantoms

SMALL = phantoms.PhantomSpec(rows=256, columns=256, pixel_spacing_mm=1.45, slices=48, slice_spacing_mm=2.5)
TINY = phantoms.PhantomSpec(rows=176, columns=176, pixel_spacing_mm=2.2, slices=44, slice_spacing_mm=3.5)
# generate(7, SMALL) without `variety` (hu, labels and tissue bytes, in that order), as the
# generator's revisions 2 to 4 make it (no isolated short pieces of clipped tubes; this phantom
# has no chest, so no lobar artery); revision 1, before
# `variety` existed, made 4303cf6093313e61192c9263a6f03ee95cba1efe04efd30e60e02a0cd39bdbc8
BEFORE = "7556d3e0dcddfca74db40c8a5473dd8d8722e550d8e69aa1e4ad9b2d32eb0a29"


def _digest(ph) -> str:
    h = hashlib.sha256()
    for a in (ph.hu, ph.labels, ph.tissue):
        h.update(a.tobytes())
    return h.hexdigest()


def test_without_variety_the_phantoms_are_unchanged():
    assert _digest(phantoms.generate(7, SMALL)) == BEFORE


def test_variety_is_deterministic_and_changes_the_phantom():
    spec = replace(SMALL, variety=True)
    a, b = phantoms.generate(7, spec), phantoms.generate(7, spec)
    assert _digest(a) == _digest(b)
    assert _digest(a) != BEFORE


def test_a_varied_slice_is_the_mean_of_its_sub_slices():
    """Revision 4: slices thicker than `SUB_SLICE_MM` are painted on thin sub-slices and
    averaged (a box slice profile); a node is labelled where it fills half the slab."""
    assert phantoms.slab_count(replace(SMALL, slice_spacing_mm=5.0)) == 1  # without variety
    varied = replace(SMALL, variety=True)
    counts = [phantoms.slab_count(replace(varied, slice_spacing_mm=ss)) for ss in (0.6, 1.0, 1.01, 2.5, 5.0)]
    assert counts == [1, 1, 2, 3, 5]
    spec = replace(TINY, slices=2, rows=4, columns=4, variety=True, slice_spacing_mm=3.0)
    affine = phantoms.phantom_affine(spec, 0.0)
    fine = phantoms._Canvas(replace(spec, slices=6, slice_spacing_mm=1.0), affine)
    fine.hu[:] = -100.0
    fine.hu[1:4, 1, 1] = 40.0  # a node in sub-slices 1-3: two of slice 0, one of slice 1
    fine.tissue[:] = phantoms.FAT
    fine.tissue[1:4, 1, 1] = phantoms.NODE
    labels = np.zeros(fine.shape, np.uint8)
    labels[1:4, 1, 1] = 1
    labels[5, 2, 2] = 2  # one sub-slice of three: under half
    cv, thick = phantoms._slab_mean(fine, labels, spec, affine, 3)
    assert cv.shape == thick.shape == (2, 4, 4)
    assert cv.hu[:, 1, 1].tolist() == pytest.approx([-20 / 3, -160 / 3])  # (2 x 40 - 100) / 3, ...
    assert cv.hu[0, 0, 0] == -100.0
    assert thick[:, 1, 1].tolist() == [1, 0] and not thick[:, 2, 2].any()
    assert cv.tissue[:, 1, 1].tolist() == [phantoms.NODE, phantoms.FAT]  # the middle sub-slice's
    spec2 = replace(spec, slices=1)
    fine2 = phantoms._Canvas(replace(spec2, slices=2, slice_spacing_mm=1.5), affine)
    halves = np.array([1, 2], np.uint8)[:, None, None] * np.ones((2, 4, 4), np.uint8)
    _, thick2 = phantoms._slab_mean(fine2, halves, spec2, affine, 2)  # two nodes, half each
    assert (thick2 == 1).all()  # the first keeps the voxel


def test_the_sub_slices_are_centred_in_their_slab():
    spec = replace(TINY, variety=True, slice_spacing_mm=4.5, slices=3)
    fine, affine = phantoms.painting_grid(spec, 10.0)
    assert (fine.slices, fine.slice_spacing_mm) == (15, 0.9) and affine[2, 0] == pytest.approx(0.9)
    z = (affine[2, 3] + np.arange(15) * affine[2, 0]).reshape(3, 5)
    assert z.mean(axis=1) == pytest.approx([10.0, 14.5, 19.0])  # each slab's mean at its slice
    assert z[:, 0] == pytest.approx([10.0 - 2.25 + 0.45, 14.5 - 2.25 + 0.45, 19.0 - 2.25 + 0.45])
    plain, plain_affine = phantoms.painting_grid(replace(spec, variety=False), 10.0)
    assert plain == replace(spec, variety=False)
    assert np.array_equal(plain_affine, phantoms.phantom_affine(plain, 10.0))


def test_thick_varied_slices_keep_each_node_where_it_is():
    """The sub-slices are centred in their slab: each node of 5 mm or more is labelled, about
    its true centre along z (within 0.3 slices, and no shift on average: painting at the
    slabs' tops would put them 1.9 mm too low)."""
    spec = replace(TINY, variety=True, slice_spacing_mm=4.5, slices=34)
    errors = []
    for seed in range(6):
        ph = phantoms.generate(seed, spec)
        assert ph.hu.shape == ph.labels.shape == (34, 176, 176)
        z = ph.affine[2, 3] + np.arange(34) * ph.affine[2, 0]
        for node in ph.nodes:
            if node.short_axis_mm < 5:
                continue
            k = np.nonzero(ph.labels == node.index)[0]
            assert k.size, node
            weights = np.bincount(k, minlength=34)
            errors.append((weights * z).sum() / weights.sum() - node.centre_lps_mm[2])
    assert len(errors) >= 10
    assert max(map(abs, errors)) <= 0.3 * 4.5 and abs(np.mean(errors)) < 0.5


def test_variety_spec_ranges():
    specs = [phantoms.variety_spec(s) for s in range(300)]
    assert all(s.variety for s in specs)
    ps = [s.pixel_spacing_mm for s in specs]
    ss = [s.slice_spacing_mm for s in specs]
    assert 0.5 <= min(ps) < 0.55 and 0.95 < max(ps) <= 1.0
    assert 0.6 <= min(ss) < 0.8 and 4.0 < max(ss) <= 5.0
    assert all(s.rows * s.columns * s.slices <= 36e6 or s.slices == 24 for s in specs)
    assert all(300 <= s.rows * s.pixel_spacing_mm <= 400 for s in specs)


@pytest.fixture(scope="module")
def varied():
    return [phantoms.generate(s, replace(TINY, variety=True, region="abdomen")) for s in range(20)]


def test_variety_adds_elongated_nodes(varied):
    ratios = [n.long_axis_mm / n.short_axis_mm for ph in varied for n in ph.nodes]
    assert max(ratios) > 2.2 and max(ratios) <= 3.0 + 1e-6


def test_variety_adds_wide_bowel_loops_and_metal(varied):
    plain = [phantoms.generate(s, replace(TINY, region="abdomen")) for s in range(4)]
    bowel_plain = np.mean([(ph.tissue == phantoms.BOWEL).sum() for ph in plain])
    bowel_varied = np.mean([(ph.tissue == phantoms.BOWEL).sum() for ph in varied[:4]])
    assert bowel_varied > 1.3 * bowel_plain
    assert any((ph.hu > 2500).any() for ph in varied)  # metal in about one phantom in seven


def test_variety_draws_patient_size_and_kernel():
    spec = replace(TINY, variety=True)
    widths = []
    for s in range(6):
        ph = phantoms.generate(s, spec)
        body = (ph.hu[ph.hu.shape[0] // 2] > -500).any(axis=0)
        widths.append(body.sum() * spec.pixel_spacing_mm)
    assert max(widths) - min(widths) > 25  # patient size 0.85-1.25


def test_evaluate_scores_the_variety_family_each_seed_on_its_own_acquisition():
    from dicom_node.cli import _parser
    from inference.evaluate import evaluate
    from inference.model_store import load_model

    seed = 1_000_007  # its drawn acquisition is small (308 x 308 x 35)
    spec = phantoms.variety_spec(seed)
    assert _digest(phantoms.generate_variety(seed)) == _digest(phantoms.generate(seed, spec))
    result = evaluate(load_model(device="cpu"), cases=1, seed=seed, family="variety")
    assert result["family"] == "variety"
    assert result["nodes"] == len(phantoms.generate_variety(seed).nodes)
    assert result["phantom"]["rows"] == [spec.rows, spec.rows]
    assert result["phantom"]["slice_spacing_mm"] == [spec.slice_spacing_mm] * 2
    assert _parser().parse_args(["evaluate", "--family", "variety"]).family == "variety"
