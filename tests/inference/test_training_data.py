"""Site training cases: NIfTI arrays are read in nodal's (slice, row, column) order."""

import nibabel as nib
import numpy as np
import pytest

from inference.training_data import Case, file_case, read_site_case


def test_nifti_case_is_turned_into_slice_row_column_order(tmp_path):
    # an (x, y, z) = (40, 30, 12) image, 0.8 x 0.8 x 2.5 mm, with one box-shaped node that is
    # 16 mm along x, 8 mm along y and 10 mm along z
    hu = np.full((40, 30, 12), -100.0, np.float32)
    lab = np.zeros(hu.shape, np.uint8)
    lab[10:30, 10:20, 4:8] = 2
    hu[lab > 0] = 40.0
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    nib.save(nib.Nifti1Image(hu, affine), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(lab, affine), tmp_path / "label.nii.gz")

    image, spacing, label = read_site_case(tmp_path / "ct.nii.gz", tmp_path / "label.nii.gz")
    assert image.shape == label.shape == (12, 30, 40)
    assert np.allclose(spacing, (2.5, 0.8, 0.8))
    assert image[5, 15, 20] == 40.0 and label[5, 15, 20] == 2

    case = file_case(tmp_path / "ct.nii.gz", tmp_path / "label.nii.gz", 1.0)
    assert case.malignant == {1: True}
    short, long = case.axes_mm[1]
    assert abs(short - 8) <= 1.0 and abs(long - 16) <= 1.0  # in-plane (axial) axes


def _case_with_node_and_distractor() -> Case:
    image = np.full((80, 80, 80), -100.0, np.float32)
    nodes = np.zeros(image.shape, np.uint8)
    nodes[5:10, 5:10, 5:10] = 1
    hard = np.zeros(image.shape, bool)
    hard[50:56, 50:56, 50:56] = True
    return Case(image=image, nodes=nodes, malignant={1: False}, axes_mm={1: (6.0, 6.0)}, hard_negative=hard)


def test_segmentation_patches_follow_the_requested_shares():
    from inference.training_data import segmentation_patches

    case = _case_with_node_and_distractor()
    rng = np.random.default_rng(0)
    _, masks = segmentation_patches(case, 20, 40, rng, node_share=1.0, hard_share=0.0)
    assert all(m.any() for m in masks)  # every patch is centred near the node
    _, masks = segmentation_patches(case, 20, 40, rng, node_share=0.0, hard_share=1.0)
    assert not any(m.any() for m in masks)  # centred on the distractor, far from the node
    with pytest.raises(ValueError, match="shares"):
        segmentation_patches(case, 1, 16, rng, node_share=0.7, hard_share=0.5)


def test_node_power_weighs_how_often_each_node_is_drawn():
    from inference.training_data import segmentation_patches

    # a 30-voxel node (27,000 voxels) and a 4-voxel one (64), far apart
    image = np.full((120, 120, 120), -100.0, np.float32)
    nodes = np.zeros(image.shape, np.uint8)
    nodes[5:35, 5:35, 5:35] = 1
    nodes[100:104, 100:104, 100:104] = 2
    case = Case(image=image, nodes=nodes, malignant={}, axes_mm={})

    def small_share(node_power: float) -> float:
        _, masks = segmentation_patches(
            case, 400, 40, np.random.default_rng(1), node_share=1.0, hard_share=0.0, node_power=node_power
        )
        # a patch centred near the small node holds none of the large one, which lies 65+ voxels away
        return float(np.mean([m.any() and m.sum() <= 64 for m in masks]))

    assert small_share(1.0) < 0.02  # drawn by voxel: 64 of 27,064
    assert 0.03 < small_share(0.5) < 0.09  # sqrt(64) / (sqrt(64) + sqrt(27,000)): 0.046
    assert 0.4 < small_share(0.0) < 0.6  # drawn by node: one in two


def test_training_continues_from_a_model_and_says_so(tmp_path):
    import torch

    from inference.model_store import save_model
    from inference.networks import NodeClassifier, build_segmenter
    from inference.train import TrainConfig, starting_weights, train_segmenter

    cfg = TrainConfig(seg_channels=(4, 8), cls_width=4, seg_steps=2, seg_batch=1, patch=16, train_crop=16)
    torch.manual_seed(1)
    seg, cls = build_segmenter(cfg.seg_channels), NodeClassifier(cfg.cls_width)
    card = {
        "name": "parent",
        "version": "0.1.0",
        "training_data": "2 phantoms",
        "intended_use": "test",
        "not_for_clinical_use": True,
        "working_spacing_mm": 1.0,
        "segmenter": {"channels": list(cfg.seg_channels), "res_units": 1},
        "classifier": {"width": cfg.cls_width},
        "training": {"command": "nodal train --cases 2"},
    }
    save_model(tmp_path / "parent", card, seg, cls)

    states, record = starting_weights(TrainConfig(**{**cfg.__dict__, "init_from": str(tmp_path / "parent")}))
    for k, v in seg.state_dict().items():
        assert torch.equal(states["segmenter"][k], v)
    assert record["name"] == "parent" and record["training_command"] == "nodal train --cases 2"
    assert set(record["weights_sha256"]) == {"segmenter", "classifier"}
    assert starting_weights(cfg) == ({}, None)  # no parent: random start

    imgs = np.zeros((2, 16, 16, 16), np.float16)
    masks = np.zeros((2, 16, 16, 16), np.uint8)
    masks[:, 6:10, 6:10, 6:10] = 1
    tuned = train_segmenter(cfg, imgs, masks, states["segmenter"])
    moved = [not torch.equal(tuned.state_dict()[k], v) for k, v in seg.state_dict().items()]
    assert any(moved)  # it trained on from the parent's weights

    with pytest.raises(ValueError, match="another shape"):
        starting_weights(TrainConfig(cls_width=8, seg_channels=(4, 8), init_from=str(tmp_path / "parent")))


def test_false_positives_of_a_model_are_mined_and_sampled():
    from inference.training_data import false_positive_map, segmentation_patches

    case = _case_with_node_and_distractor()
    prob = np.zeros(case.image.shape, np.float32)
    prob[6:9, 6:9, 6:9] = 0.9  # on the node: a true positive, not mined
    prob[60:64, 20:24, 20:24] = 0.8  # in plain tissue: a false positive
    prob[30:32, 30:32, 30:32] = 0.4  # under the threshold
    fp = false_positive_map(prob, case.nodes)
    assert fp.sum() == 64 and fp[61, 21, 21] and not fp[7, 7, 7] and not fp[31, 31, 31]

    case.mined = fp
    case.image[fp] = 55.0  # mark the mistake in the image
    rng = np.random.default_rng(1)
    images, masks = segmentation_patches(case, 10, 40, rng, 0.0, 0.0, mined_share=1.0)
    assert not any(m.any() for m in masks)
    # every patch holds the mined component (centre jittered by up to 12 voxels)
    assert all((img == 55.0).any() for img in images)


def test_seg_steps_zero_keeps_the_parents_segmenter_and_retrains_the_classifier(tmp_path, monkeypatch):
    import torch

    from inference import train as train_module
    from inference.classify import CROP
    from inference.model_store import read_card, save_model
    from inference.networks import NodeClassifier, build_segmenter
    from inference.train import TrainConfig

    torch.manual_seed(2)
    parent = tmp_path / "parent"
    card = {
        "name": "parent",
        "version": "0.1.0",
        "training_data": "phantoms",
        "intended_use": "test",
        "not_for_clinical_use": True,
        "working_spacing_mm": 1.0,
        "segmenter": {"channels": [4, 8], "res_units": 1},
        "classifier": {"width": 4},
    }
    save_model(parent, card, build_segmenter((4, 8)), NodeClassifier(4))
    rng = np.random.default_rng(0)
    crops = [rng.normal(0, 1, (2, CROP, CROP, CROP)).astype(np.float16) for _ in range(32)]
    samples = (
        np.zeros((0, 16, 16, 16), np.float16),
        np.zeros((0, 16, 16, 16), np.uint8),
        crops,
        [(8.0, 12.0)] * 32,
        [i % 2 == 0 for i in range(32)],
    )
    monkeypatch.setattr(train_module, "collect", lambda *a, **k: samples)

    cfg = TrainConfig(
        seg_channels=(4, 8),
        cls_width=4,
        seg_steps=0,
        cls_epochs=1,
        init_from=str(parent),
        fresh_classifier=True,
        patches_per_case=0,
    )
    out = train_module.train(tmp_path / "child", cfg)
    before, after = read_card(parent)["weights"], read_card(out)["weights"]
    assert after["segmenter"]["sha256"] == before["segmenter"]["sha256"]  # untouched
    assert after["classifier"]["sha256"] != before["classifier"]["sha256"]
    assert read_card(out)["training"]["initialised_from"]["version"] == "0.1.0"

    with pytest.raises(ValueError, match="keeps the segmenter"):
        train_module.train(tmp_path / "orphan", TrainConfig(seg_channels=(4, 8), cls_width=4, seg_steps=0))


def test_mixed_training_joins_plain_and_variety_samples_each_from_its_own_cache(tmp_path, monkeypatch):
    from inference import train as train_module
    from inference.train import TrainConfig, collect

    made = []

    def fake_collect(cfg, data_dir):
        made.append(cfg.variety)
        mark = 2.0 if cfg.variety else 1.0
        return (
            np.full((2, 4, 4, 4), mark, np.float16),
            np.zeros((2, 4, 4, 4), np.uint8),
            [np.full((2, 3, 3, 3), mark, np.float16)],
            [(mark, mark)],
            [cfg.variety],
        )

    monkeypatch.setattr(train_module, "_collect", fake_collect)
    cfg = TrainConfig(cases=2, seed=5, mixed=True)
    imgs, masks, crops, scalars, labels = collect(cfg, None, tmp_path)
    assert [float(c.max()) for c in crops] == [1.0, 2.0]
    assert made == [False, True]
    assert [float(i.max()) for i in imgs] == [1.0, 1.0, 2.0, 2.0]  # plain first, then variety
    assert labels == [False, True] and scalars == [(1.0, 1.0), (2.0, 2.0)] and len(masks) == 4
    caches = sorted(p.name for p in tmp_path.glob("samples-*.pkl"))
    # the key ends with the generator's revision (phantoms.revision_tag)
    assert caches == ["samples-s5-n2-p64x48-w1.0-r3.pkl", "samples-s5-n2-p64x48-w1.0-variety-r4.pkl"]
    # the second run reads both entries back and generates nothing
    again = collect(cfg, None, tmp_path)
    assert made == [False, True] and again[4] == labels
    assert "plain and domain-randomised" in train_module.family_words(cfg)


def test_thick_slices_blur_along_the_slice_axis_only_as_a_resampled_thick_ct_would():
    """`--thick-share`: a batch seen as slices `t` voxels thick and apart, resampled back to
    the working grid: a one-slice spot becomes a low, wide bump of the same sum; a ramp along
    the slices and everything within a slice are kept."""
    import torch

    from inference.train import thick_slices

    spot = torch.zeros(1, 1, 30, 2, 3)
    spot[:, :, 15] = 100.0
    for t in (3, 4, 5):
        for phase in range(t):
            out = thick_slices(spot, t, phase)
            assert out.shape == spot.shape
            profile = out[0, 0, :, 0, 0]
            assert float(profile.sum()) == pytest.approx(100.0, rel=1e-5)
            assert float(profile.max()) <= 100.0 / t + 1e-4  # the slab's mean at most
            assert torch.equal(out[..., 0, 0], out[..., 1, 2])  # each column alike: no in-plane blur
    ramp = torch.arange(30.0).view(1, 1, 30, 1, 1).expand(1, 1, 30, 2, 2)
    inner = thick_slices(ramp, 4, 1)[0, 0, 6:24, 0, 0]
    assert torch.allclose(inner, torch.arange(6.0, 24.0))


def test_augmenters_move_the_mask_with_the_image_and_change_only_the_ct_in_intensity():
    """`--augment`: the spatial transform rotates and scales a patch's mask with its CT (a
    bright cube stays under its mask), the intensity transforms change the CT and never the
    mask, probability 0 changes nothing, and the same seed gives the same items."""
    import torch

    from inference.train import _each, augmenters

    hu = torch.full((6, 1, 40, 40, 40), -100.0)
    hu[:, :, 12:28, 14:26, 10:30] = 60.0
    mask = (hu > 0).float()
    spatial, intensity = augmenters(1.0, seed=3)
    moved = _each(spatial, hu=hu, mask=mask)
    assert moved["hu"].shape == hu.shape and moved["mask"].shape == mask.shape
    assert type(moved["hu"]) is torch.Tensor  # not MONAI's MetaTensor
    assert set(moved["mask"].unique().tolist()) <= {0.0, 1.0}
    for h, m, m0 in zip(moved["hu"], moved["mask"], mask, strict=True):
        assert not torch.equal(m, m0)  # rotated and scaled
        assert 0.4 < float(m.sum() / m0.sum()) < 2.5  # 0.8-1.33 times along each axis
        assert float((h[m > 0] > 0).float().mean()) > 0.9  # the cube's CT lies under its mask
        assert float((h[m == 0] > 0).float().mean()) < 0.05
    noisy = _each(intensity, hu=hu, mask=mask)
    assert torch.equal(noisy["mask"], mask) and not torch.equal(noisy["hu"], hu)
    assert float((noisy["hu"] - hu).abs().mean()) < 40.0
    for off in augmenters(0.0, seed=3):
        unchanged = _each(off, hu=hu, mask=mask)
        assert torch.equal(unchanged["hu"], hu) and torch.equal(unchanged["mask"], mask)
    again = _each(augmenters(1.0, seed=3)[0], hu=hu, mask=mask)
    assert torch.equal(again["hu"], moved["hu"]) and torch.equal(again["mask"], moved["mask"])


def test_an_augmented_crop_is_blurred_without_drawing_zeros_in_at_its_edge():
    """The blur sees the crop's own edge replicated around it: a crop of fat stays fat up to
    its faces and corners (blurred against zero padding, its faces would read about -70 HU
    and its corners -33)."""
    import torch

    from inference.train import augmented, augmenters

    hu = torch.full((8, 1, 64, 64, 64), -100.0)
    mask = torch.zeros_like(hu)
    crop = (slice(None), slice(None), *(slice(8, 56),) * 3)
    out, out_mask = augmented(augmenters(1.0, seed=5), hu, mask, crop)
    assert out.shape == (8, 1, 48, 48, 48) and out_mask.shape == out.shape
    assert not torch.equal(out, hu[crop])  # noise and blur applied
    for face in (out[..., 0, :, :], out[..., -1, :, :], out[..., :, 0, :], out[..., :, :, -1]):
        assert float(face.mean()) == pytest.approx(-100.0, abs=3.0)
    corners = out[..., [0, -1]][..., [0, -1], :][..., [0, -1], :, :]
    assert float(corners.mean()) == pytest.approx(-100.0, abs=10.0)


def test_the_segmenter_trains_as_without_augment_when_nothing_is_drawn_and_otherwise_not():
    """With `--augment` the segmenter's weights differ from a training without it, and both
    are reproducible from the seed; with a probability so small that no augmentation is ever
    drawn, the augmented path (each item through MONAI, the crop, the replicated edge) gives
    exactly the weights of the plain one. (Without the option the weights are those of the
    code before it, checked once by hand: the random draws are made in the same order.)"""
    import numpy as np
    import torch

    from inference.train import TrainConfig, train_segmenter

    rng = np.random.default_rng(0)
    imgs = rng.normal(0, 60, (4, 64, 64, 64)).astype(np.int16)
    masks = np.zeros((4, 64, 64, 64), np.uint8)
    masks[:, 26:38, 26:38, 26:38] = 1
    imgs[masks > 0] = 80

    def weights(augment: float) -> torch.Tensor:
        cfg = TrainConfig(seg_steps=2, seg_channels=(4, 8), augment=augment)
        return torch.cat([p.detach().flatten() for p in train_segmenter(cfg, imgs, masks).parameters()])

    plain, augmented = weights(0.0), weights(1.0)
    assert torch.equal(plain, weights(0.0)) and torch.equal(augmented, weights(1.0))
    assert torch.equal(plain, weights(1e-12))
    assert not torch.equal(plain, augmented)
