"""Components split at their narrow necks: `inference.necks` and `inference.nodes.components`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from inference.evaluate import array_volume
from inference.model_store import ModelCardError, load_model
from inference.necks import split_component, split_labels
from inference.nodes import components
from inference.preprocess import to_working

Z, Y, X = np.mgrid[:30, :30, :70]


def _ball(x: int, r: int) -> np.ndarray:
    return (Z - 15) ** 2 + (Y - 15) ** 2 + (X - x) ** 2 <= r**2


def _bridge(x0: int, x1: int, r: int) -> np.ndarray:
    return (r**2 >= (Z - 15) ** 2 + (Y - 15) ** 2) & (x0 < X) & (x1 > X)


def test_two_parts_joined_by_a_thin_bridge_are_split_and_keep_every_voxel() -> None:
    comp = _ball(15, 8) | _ball(42, 10) | _bridge(15, 42, 2)
    parts = split_component(comp, 0.5)
    assert len(parts) == 2
    assert sum(p.astype(int) for p in parts).max() == 1
    assert np.array_equal(np.logical_or.reduce(parts), comp)
    small, big = sorted(parts, key=lambda p: p.sum())
    assert small[15, 15, 15] and big[15, 15, 42]  # each ball in a part of its own


def test_a_bridge_as_thick_as_half_the_thinner_part_does_not_split() -> None:
    assert len(split_component(_ball(15, 8) | _ball(42, 10) | _bridge(15, 42, 5), 0.5)) == 1


def test_an_elongated_node_is_not_split() -> None:
    ellipsoid = ((Z - 15) / 5) ** 2 + ((Y - 15) / 5) ** 2 + ((X - 35) / 15) ** 2 <= 1
    assert len(split_component(ellipsoid, 0.5)) == 1


def test_a_chain_of_three_is_split_into_three() -> None:
    chain = _ball(10, 7) | _ball(35, 7) | _ball(60, 7) | _bridge(10, 60, 2)
    parts = split_component(chain, 0.5)
    assert len(parts) == 3
    assert np.array_equal(np.logical_or.reduce(parts), chain)


def test_split_labels_numbers_the_parts_and_says_where_each_came_from() -> None:
    labels = np.zeros(Z.shape, dtype=np.int32)
    labels[_ball(15, 8) | _ball(42, 10) | _bridge(15, 42, 2)] = 1
    labels[(Z - 5) ** 2 + (Y - 5) ** 2 + (X - 65) ** 2 <= 9] = 2  # a lone blob
    out, origin = split_labels(labels, 2, 0.5)
    assert out.max() == 3 and sorted(origin.tolist()) == [1, 1, 2]
    assert np.array_equal(out > 0, labels > 0)
    assert origin[out[15, 15, 15] - 1] == 1 and origin[out[5, 5, 65] - 1] == 2


def test_components_with_a_neck_ratio_give_each_part_as_a_candidate_of_its_own() -> None:
    hu = np.full(Z.shape, 40.0, dtype=np.float32)  # all body: the working grid is the volume
    affine = np.eye(4)
    volume = array_volume(hu, affine, "necks")
    image_w, grid = to_working(volume.array, volume.spacing, 1.0)
    prob = np.where(_ball(15, 8) | _ball(42, 10) | _bridge(15, 42, 2), 0.9, 0.0).astype(np.float32)
    whole = components(volume, image_w, prob, grid, 0.5, 20.0)
    parts = components(volume, image_w, prob, grid, 0.5, 20.0, neck_ratio=0.5)
    assert len(whole) == 1 and len(parts) == 2
    for c in parts:  # no part reaches into the other one
        xs = np.nonzero(c.mask)[2] + c.bbox[2]
        assert xs.max() - xs.min() < 30
    assert sum(int(c.mask.sum()) for c in parts) == int(whole[0].mask.sum())


@pytest.mark.parametrize("ratio", [0, 1, 1.5, "half"])
def test_a_card_with_a_neck_ratio_outside_0_to_1_is_refused(model_copy, ratio) -> None:
    card = json.loads((model_copy / "model_card.json").read_text())
    card["segmenter"]["neck_ratio"] = ratio
    (model_copy / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ModelCardError, match="neck_ratio"):
        load_model(model_copy)


def test_the_shipped_model_does_not_split() -> None:
    assert load_model().neck_ratio is None
