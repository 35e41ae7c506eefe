"""Components split at their narrow necks: `inference.necks` and `inference.nodes.components`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from inference.evaluate import array_volume
from inference.model_store import ModelCardError, load_model
from inference.necks import Necks, split_component
from inference.nodes import components, measure_node, parts_of, rejoined
from inference.preprocess import to_working

Z, Y, X = np.mgrid[:30, :30, :70]
NECKS = Necks(ratio=0.5, max_neck_mm=10.0, part_threshold=0.9)


def _ball(x: int, r: int) -> np.ndarray:
    return (Z - 15) ** 2 + (Y - 15) ** 2 + (X - x) ** 2 <= r**2


def _bridge(x0: int, x1: int, r: int) -> np.ndarray:
    return (r**2 >= (Z - 15) ** 2 + (Y - 15) ** 2) & (x0 < X) & (x1 > X)


def test_two_parts_joined_by_a_thin_bridge_are_split_and_keep_every_voxel() -> None:
    comp = _ball(15, 8) | _ball(42, 10) | _bridge(15, 42, 2)
    parts = split_component(comp, NECKS)
    assert len(parts) == 2
    assert sum(p.astype(int) for p in parts).max() == 1
    assert np.array_equal(np.logical_or.reduce(parts), comp)
    small, big = sorted(parts, key=lambda p: p.sum())
    assert small[15, 15, 15] and big[15, 15, 42]  # each ball in a part of its own


def test_a_bridge_as_thick_as_half_the_thinner_part_does_not_split() -> None:
    assert len(split_component(_ball(15, 8) | _ball(42, 10) | _bridge(15, 42, 5), NECKS)) == 1


def test_an_elongated_node_is_not_split() -> None:
    ellipsoid = ((Z - 15) / 5) ** 2 + ((Y - 15) / 5) ** 2 + ((X - 35) / 15) ** 2 <= 1
    assert len(split_component(ellipsoid, NECKS)) == 1


def test_a_chain_of_three_is_split_into_three() -> None:
    chain = _ball(10, 7) | _ball(35, 7) | _ball(60, 7) | _bridge(10, 60, 2)
    parts = split_component(chain, NECKS)
    assert len(parts) == 3
    assert np.array_equal(np.logical_or.reduce(parts), chain)


def test_a_bridge_deeper_than_the_largest_neck_does_not_split() -> None:
    comp = _ball(15, 8) | _ball(42, 10) | _bridge(15, 42, 2)
    assert len(split_component(comp, Necks(ratio=0.5, max_neck_mm=1.0, part_threshold=0.9))) == 1


def test_depth_is_measured_in_mm_of_the_voxel_spacing() -> None:
    comp = _ball(15, 8) | _ball(42, 10) | _bridge(15, 42, 2)  # a 2-voxel bridge
    assert len(split_component(comp, Necks(0.5, 3.0, 0.9), (1.0, 1.0, 1.0))) == 2
    assert len(split_component(comp, Necks(0.5, 3.0, 0.9), (2.0, 2.0, 2.0))) == 1  # 4 mm deep there


def _whole_and_parts(keep_working: bool = True):
    """The component of two balls joined by a thin bridge, and its parts (`parts_of`)."""
    hu = np.full(Z.shape, 40.0, dtype=np.float32)  # all body: the working grid is the volume
    volume = array_volume(hu, np.eye(4), "necks")
    image_w, grid = to_working(volume.array, volume.spacing, 1.0)
    prob = np.where(_ball(15, 8) | _ball(42, 10) | _bridge(15, 42, 2), 0.9, 0.0).astype(np.float32)
    [whole] = components(volume, image_w, prob, grid, 0.5, 20.0, keep_working)
    parts = parts_of(whole, 7, NECKS, volume, image_w, grid, 0.5, 20.0)
    return whole, parts, image_w, grid


def _xs(c) -> np.ndarray:
    return np.nonzero(c.mask)[2] + c.bbox[2]


def test_a_component_is_split_into_parts_each_without_the_others_voxels() -> None:
    plain, none, _, _ = _whole_and_parts(keep_working=False)
    whole, parts, _, _ = _whole_and_parts()
    assert none == [] and np.array_equal(whole.mask, plain.mask)  # the whole as it was
    assert len(parts) == 2 and {c.part_of for c in parts} == {7}
    for c in parts:  # no part reaches into the other one; each crop is centred on its part
        assert _xs(c).max() - _xs(c).min() < 30
        assert c.crop is not None and c.crop[1].sum() > 0
        assert np.allclose(ndimage.center_of_mass(c.crop[1]), (c.crop.shape[1] - 1) / 2, atol=2)
    assert sum(int(c.mask.sum()) for c in parts) == int(whole.mask.sum())


def test_kept_parts_are_joined_again_and_a_lone_kept_part_stays_alone() -> None:
    whole, parts, image_w, grid = _whole_and_parts()
    [joined] = rejoined(parts, image_w, grid)
    assert joined.part_of == 0 and joined.crop is not None
    assert int(joined.mask.sum()) == int(whole.mask.sum())
    assert (_xs(joined).min(), _xs(joined).max()) == (_xs(whole).min(), _xs(whole).max())
    big = max(parts, key=lambda c: c.mask.sum())
    assert rejoined([big], image_w, grid) == [big]  # the checker dropped the other part
    assert rejoined([whole], image_w, grid) == [whole]  # never split: as it was


@pytest.mark.parametrize(
    "entry",
    [
        {"ratio": 0, "max_neck_mm": 2.5},
        {"ratio": 1, "max_neck_mm": 2.5},
        {"ratio": 0.7, "max_neck_mm": -1},
        {"ratio": "half", "max_neck_mm": 2.5},
        {"ratio": 0.7},
        0.7,
    ],
)
def test_a_card_with_necks_that_are_not_a_ratio_below_1_and_a_depth_is_refused(model_copy, entry) -> None:
    card = json.loads((model_copy / "model_card.json").read_text())
    card["segmenter"]["necks"] = entry
    (model_copy / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ModelCardError, match=r"segmenter\.necks"):
        load_model(model_copy)


def test_necks_go_to_the_card_and_back() -> None:
    necks = Necks(0.7, 2.5, 0.9)
    assert Necks.from_card(necks.to_card()) == necks
    assert Necks.from_card(None) is None


def test_nodal_necks_writes_the_split_into_the_card_and_removes_it(model_copy, capsys) -> None:
    from dicom_node.cli import main

    argv = ["necks", "--model-dir", str(model_copy)]
    split = ["--ratio", "0.7", "--max-neck-mm", "2.5", "--part-threshold", "0.9"]
    assert main([*argv, *split, "--version", "9.9.9"]) == 0
    model = load_model(model_copy)
    assert model.necks == Necks(0.7, 2.5, 0.9) and model.version == "9.9.9"
    assert main([*argv, *split[:-1], "1.2"]) == 2  # refused, the card unchanged
    assert main([*argv, "--ratio", "0.7"]) == 2
    assert main([*argv, "--remove", "--ratio", "0.7"]) == 2
    assert load_model(model_copy).necks == Necks(0.7, 2.5, 0.9)
    assert main([*argv, "--remove"]) == 0
    assert load_model(model_copy).necks is None
    assert "part_threshold" in capsys.readouterr().err


def test_the_pipeline_judges_the_parts_of_a_rejected_component_in_its_place(model_copy) -> None:
    """A checker that rejects every candidate, parts kept at any probability: what is found
    is exactly the split components, each part judged, the parts of one joined again."""
    from inference import phantoms
    from inference.evaluate import phantom_volume
    from inference.pipeline import PipelineSettings, _detect, analyse

    card = json.loads((model_copy / "model_card.json").read_text())
    card["checker"]["threshold"] = 1.01
    (model_copy / "model_card.json").write_text(json.dumps(card))
    spec = phantoms.PhantomSpec(rows=200, columns=200, pixel_spacing_mm=1.6, slices=40, slice_spacing_mm=3.0)
    volume = phantom_volume(phantoms.generate(11, spec))
    assert analyse(volume, load_model(model_copy)).findings.findings == ()

    necks = Necks(ratio=0.9, max_neck_mm=10.0, part_threshold=1e-9)
    card["segmenter"]["necks"] = necks.to_card()
    (model_copy / "model_card.json").write_text(json.dumps(card))
    model = load_model(model_copy)
    settings = PipelineSettings(plausibility=False)
    pairs, _, image_w, grid = _detect(volume, model, settings)
    split = [
        (c, p)
        for n, (c, _) in enumerate(pairs)
        if (p := parts_of(c, n + 1, necks, volume, image_w, grid, 0.5, 20.0))
    ]
    assert split, "the phantom has a component that splits"
    found = analyse(volume, model, settings).findings.findings
    measured = [
        [p for p in parts if (m := measure_node(volume, p)) and m["volume_mm3"] >= 20] for _, parts in split
    ]
    assert 0 < len(found) <= sum(len(rejoined(parts, image_w, grid)) for parts in measured)
    for f in found:  # each from a split component: a part is carried within its component's box
        # (not within its mask: where the component's own carry to the native grid breaks
        # into pieces, only its largest piece is its mask, and a part may be another piece)
        assert any(_within(f.bbox, c.bbox) for c, _ in split), f.bbox


def _within(inner, outer) -> bool:
    return all(o <= i for i, o in zip(inner[:3], outer[:3], strict=True)) and all(
        i <= o for i, o in zip(inner[3:], outer[3:], strict=True)
    )
