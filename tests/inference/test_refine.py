"""The node's edge settled on the image: a mask drawn too small or too large comes to the
half-way density between node and fat; a bright vessel beside the node stays out; a
necrotic centre or a fatty hilum stays in; without fat around, the mask is kept."""

import numpy as np
import pytest
from scipy import ndimage

from inference.measure import axial_diameters
from inference.refine import refine

SPACING = (2.0, 0.8, 0.8)
SHAPE = (16, 60, 60)
NODE_HU, FAT_HU = 45.0, -100.0


def ellipsoid(semi_mm, centre=(8.0, 30.2, 29.7)) -> np.ndarray:
    k, j, i = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    q = sum(((g - c) * s / a) ** 2 for g, c, s, a in zip((k, j, i), centre, SPACING, semi_mm, strict=True))
    return q <= 1.0


def ct(node: np.ndarray, noise_hu: float = 8.0, seed: int = 0) -> np.ndarray:
    """Node in fat, with the blur of a scanner and its noise."""
    hu = np.where(node, NODE_HU, FAT_HU).astype(np.float32)
    hu = ndimage.gaussian_filter(hu, (0.3, 0.7, 0.7))
    return hu + np.random.default_rng(seed).normal(0, noise_hu, hu.shape).astype(np.float32)


SEMI = (6.0, 5.0, 8.0)  # z, short, long (mm)


def short_axis(soft: np.ndarray) -> float:
    key = int(np.argmax((soft >= 0.5).sum(axis=(1, 2))))
    return axial_diameters(soft[key], SPACING[1:]).short_mm


IN_PLANE = np.zeros((3, 3, 3), bool)
IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


@pytest.mark.parametrize("iterations", [-2, -1, 1, 2])  # network mask 0.8-1.6 mm too small / large
def test_edge_moves_to_half_way_density(iterations):
    truth = ellipsoid(SEMI)
    net = (
        ndimage.binary_dilation(truth, IN_PLANE, iterations=iterations)
        if iterations > 0
        else ndimage.binary_erosion(truth, IN_PLANE, iterations=-iterations)
    )
    soft = np.where(net, 0.9, 0.1).astype(np.float32)
    out = refine(ct(truth), soft, net, SPACING, grow_mm=3.0)
    assert out is not None
    membership, mask = out
    assert short_axis(membership) == pytest.approx(2 * SEMI[1], abs=SPACING[1])
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.9
    assert abs(short_axis(soft) - 2 * SEMI[1]) > abs(short_axis(membership) - 2 * SEMI[1])


def test_bright_vessel_beside_the_node_stays_out():
    truth = ellipsoid(SEMI)
    hu = ct(truth)
    vessel = ellipsoid((20.0, 3.0, 3.0), centre=(8.0, 30.2, 42.5))  # touching the node's side
    hu[vessel & ~truth] = 250.0  # arterial contrast
    net = ndimage.binary_erosion(truth)
    out = refine(hu, np.where(net, 0.9, 0.1).astype(np.float32), net, SPACING, grow_mm=3.0)
    assert out is not None
    assert not (out[1] & vessel & ~ndimage.binary_dilation(truth)).any()


def test_necrotic_centre_and_fatty_hilum_stay_in():
    truth = ellipsoid(SEMI)
    hu = ct(truth)
    necrosis = ellipsoid((3.0, 2.5, 4.0))
    hu[necrosis] = 12.0
    hilum = ellipsoid((2.5, 2.0, 2.0), centre=(8.0, 30.2, 35.0))
    hu[hilum] = -90.0
    net = truth.copy()
    out = refine(hu, np.where(net, 0.9, 0.1).astype(np.float32), net, SPACING, grow_mm=3.0)
    assert out is not None
    assert out[1][necrosis].all() and out[1][hilum & truth].mean() > 0.95


def test_no_fat_around_keeps_the_network_mask():
    truth = ellipsoid(SEMI)
    hu = np.full(SHAPE, 50.0, np.float32)  # node inside muscle: no edge on the image
    assert refine(hu, np.where(truth, 0.9, 0.1).astype(np.float32), truth, SPACING, grow_mm=3.0) is None
    assert refine(ct(truth), np.zeros(SHAPE, np.float32), truth, SPACING, grow_mm=0.0) is None


def test_classifier_crop_from_a_native_mask_matches_the_working_grid_crop():
    """`working_crop` carries a native mask to the working grid where the network's own
    crops are made: the same node gives the same classifier input either way."""
    from inference.classify import crop_around
    from inference.nodes import working_crop
    from inference.preprocess import to_working
    from inference.training_data import nearest

    spacing = (2.5, 0.7, 0.7)
    shape = (40, 140, 150)
    k, j, i = np.mgrid[: shape[0], : shape[1], : shape[2]]
    q = ((k - 19.6) * spacing[0] / 9.0) ** 2 + ((j - 70.3) * spacing[1] / 6.0) ** 2
    q = q + ((i - 81.2) * spacing[2] / 10.0) ** 2
    node = q <= 1.0
    hu = np.where(node, NODE_HU, -100.0).astype(np.float32)
    image_w, grid = to_working(hu, spacing, 1.0, crop=False)
    labels_w = nearest(node.astype(np.uint8), grid)
    sl = ndimage.find_objects(labels_w)[0]
    centre = [c + s.start for c, s in zip(ndimage.center_of_mass(labels_w[sl]), sl, strict=True)]
    extent = max(s.stop - s.start for s in sl)
    reference = crop_around(image_w, labels_w, centre, extent, label=1)

    box = ndimage.find_objects(node.astype(np.uint8))[0]
    bbox = (*(s.start for s in box), *(s.stop for s in box))
    crop = working_crop(image_w, grid, node[box], bbox)
    assert crop.shape == reference.shape
    np.testing.assert_allclose(crop[0], reference[0], atol=0.05)  # the same CT cube
    a, b = crop[1] > 0.5, reference[1] > 0.5
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.9  # and the same node in it


@pytest.mark.parametrize("gap_voxels", [0, 1])
def test_the_edge_does_not_grow_into_an_organ_the_node_lies_on(gap_voxels):
    """A node pressed against an organ of its density: the edge is settled on the node's side
    of the contact (a watershed cut at the neck), not grown up to 3 mm into the organ."""
    truth = ellipsoid(SEMI)
    below = int(np.nonzero(truth.any(axis=(0, 2)))[0].max()) + 1 + gap_voxels
    organ = np.zeros(SHAPE, bool)
    organ[:, below : below + 12, 10:50] = True  # along the short axis, 9.6 mm thick
    net = ndimage.binary_erosion(truth, IN_PLANE, iterations=1)
    out = refine(ct(truth | organ), np.where(net, 0.9, 0.1).astype(np.float32), net, SPACING, grow_mm=3.0)
    assert out is not None
    membership, mask = out
    assert short_axis(membership) == pytest.approx(2 * SEMI[1], abs=0.5)  # grown into it: 11.5-11.7 mm
    assert not (mask & organ).any()
