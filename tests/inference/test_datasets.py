"""Site datasets: phantoms exported as nnU-Net raw datasets and as CT with DICOM SEG read back
to the generator's ground truth, voxel for voxel; the layouts' errors; `evaluate --data`."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest

from inference import phantoms
from inference.dataset_export import export_dicom_seg, export_nnunet, phantom_label
from inference.datasets import DatasetError, label_mapping, nodal_value, open_dataset
from inference.evaluate import HIT_MIN_IOU

SMALL = phantoms.PhantomSpec(rows=64, columns=64, pixel_spacing_mm=3.0, slices=12, slice_spacing_mm=4.0)


@pytest.fixture(scope="module")
def pair():
    out = [phantoms.generate(seed, SMALL) for seed in (13, 14)]  # generator revision 2
    assert all(ph.nodes for ph in out)
    assert any(n.malignant for ph in out for n in ph.nodes)  # both label values occur
    return out


def _same_as_generator(case, ph, label=None):
    assert case.hu.shape == case.label.shape == ph.hu.shape
    assert np.array_equal(case.hu, ph.hu.astype(np.float32))
    assert np.allclose(case.affine, ph.affine, atol=1e-3)
    assert np.array_equal(case.label, phantom_label(ph) if label is None else label)


def test_nnunet_export_reads_back_as_the_generators_truth(tmp_path, pair):
    export_nnunet(pair[:1], tmp_path, test=pair[1:])
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert meta["numTraining"] == 1 and meta["channel_names"] == {"0": "CT"}
    ds = open_dataset(tmp_path)
    assert ds.layout == "nnunet"
    assert [c.split for c in ds.cases] == ["train", "test"]
    assert ds.evaluation_cases()[0] == "test"
    for ref, ph in zip(ds.cases, pair, strict=True):
        _same_as_generator(ref.load(), ph)


def test_dicom_seg_export_reads_back_by_references_and_by_position(tmp_path, pair):
    segs = export_dicom_seg(pair, tmp_path)
    ds = open_dataset(tmp_path)
    assert ds.layout == "dicom-seg" and len(ds.cases) == 2
    for ref, ph in zip(ds.cases, pair, strict=True):
        case = ref.load()
        _same_as_generator(case, ph)
        assert case.volume is not None and case.volume.shape == ph.hu.shape

    # without per-frame source references the planes are placed by Image Position (Patient)
    seg = pydicom.dcmread(segs[0])
    assert "DerivationImageSequence" in seg.PerFrameFunctionalGroupsSequence[0]
    for frame in seg.PerFrameFunctionalGroupsSequence:
        del frame.DerivationImageSequence
    seg.save_as(segs[0])
    _same_as_generator(open_dataset(tmp_path).cases[0].load(), pair[0])


def test_one_segment_for_all_nodes_reads_as_nodes_of_unknown_malignancy(tmp_path, pair):
    export_dicom_seg(pair[:1], tmp_path, per_node=False)
    case = open_dataset(tmp_path).cases[0].load()
    _same_as_generator(case, pair[0], (pair[0].labels > 0).astype(np.uint8))


@pytest.mark.parametrize("seg_type", ["FRACTIONAL", "LABELMAP"])
def test_fractional_and_label_map_segs_read_back_alike(tmp_path, pair, seg_type):
    from inference.dataset_export import phantom_seg

    ph = pair[0]
    paths = phantoms.write_phantom(ph, tmp_path / "case" / "ct")
    phantom_seg(ph, paths, seg_type=seg_type).save_as(tmp_path / "case" / "seg.dcm")
    _same_as_generator(open_dataset(tmp_path).cases[0].load(), ph)


def test_a_seg_without_its_ct_is_refused(tmp_path, pair):
    export_dicom_seg(pair, tmp_path)
    for f in (tmp_path / "phantom_0000014" / "ct").glob("*.dcm"):
        f.unlink()
    with pytest.raises(DatasetError, match=r"SEG #2 .* not under the folder"):
        open_dataset(tmp_path)


def test_label_names_map_to_nodal_values_or_are_refused():
    assert [nodal_value(n) for n in ("background", "Lymph_Node", "LN", "lymph nodes")] == [0, 1, 1, 1]
    assert [nodal_value(n) for n in ("malignant", "metastatic lymph node", "benign lymph node")] == [2, 2, 1]
    assert nodal_value("non-malignant node") == 1
    assert [nodal_value(n) for n in ("tumour", "metastasis", "liver", "nodule")] == [None] * 4
    assert label_mapping({"background": 0, "lymph node": 1, "malignant lymph node": 2}) == {0: 0, 1: 1, 2: 2}
    assert label_mapping({"background": 0, "node": 1, "aorta": 2}, {"aorta": 0}) == {0: 0, 1: 1, 2: 0}
    with pytest.raises(DatasetError, match=r"cannot tell .*\['liver'\]"):
        label_mapping({"background": 0, "lymph node": 1, "liver": 2})
    with pytest.raises(DatasetError, match="region"):
        label_mapping({"background": 0, "nodes": [1, 2]})


@pytest.fixture
def nnunet_dir(tmp_path, pair):
    return export_nnunet(pair, tmp_path / "ds")


def test_nnunet_errors_say_what_is_wrong(nnunet_dir, pair):
    meta_path = nnunet_dir / "dataset.json"
    meta = json.loads(meta_path.read_text())

    meta_path.write_text(json.dumps({**meta, "labels": {"background": 0, "spleen": 1}}))
    with pytest.raises(DatasetError, match="spleen"):
        open_dataset(nnunet_dir)

    meta_path.write_text(json.dumps({**meta, "numTraining": 3}))
    with pytest.raises(DatasetError, match="numTraining 3"):
        open_dataset(nnunet_dir)

    meta_path.write_text(json.dumps({**meta, "channel_names": {"0": "T2"}}))
    with pytest.raises(DatasetError, match="one CT channel"):
        open_dataset(nnunet_dir)

    meta_path.write_text(json.dumps(meta))
    label = nnunet_dir / "labelsTr" / "phantom_0000013.nii.gz"
    img = nib.load(label)
    data = np.asanyarray(img.dataobj)

    shifted = img.affine.copy()
    shifted[0, 3] += 1.5
    nib.save(nib.Nifti1Image(data, shifted), label)
    with pytest.raises(DatasetError, match="voxel grid"):
        open_dataset(nnunet_dir).cases[0].load()

    nib.save(nib.Nifti1Image(data[:, :, :-1], img.affine), label)
    with pytest.raises(DatasetError, match="shape"):
        open_dataset(nnunet_dir).cases[0].load()

    bad = data.copy()
    bad[0, 0, 0] = 3
    nib.save(nib.Nifti1Image(bad, img.affine), label)
    with pytest.raises(DatasetError, match=r"values \[3\]"):
        open_dataset(nnunet_dir).cases[0].load()

    (nnunet_dir / "imagesTr" / "phantom_0000014_0000.nii.gz").unlink()
    with pytest.raises(DatasetError, match="no image"):
        open_dataset(nnunet_dir)


def test_a_folder_of_nothing_known_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("no data")
    with pytest.raises(DatasetError, match="no DICOM SEG"):
        open_dataset(tmp_path)


def test_training_samples_come_from_an_nnunet_dataset(nnunet_dir, pair):
    from inference.train import TrainConfig, collect
    from inference.training_data import labelled_case

    cfg = TrainConfig(patch=16, patches_per_case=2)
    imgs, masks, crops, _, labels = collect(cfg, nnunet_dir)
    assert imgs.shape == (4, 16, 16, 16) and masks.shape == imgs.shape
    # one classifier sample per node: what the generator's own arrays give on the working grid
    direct = [labelled_case(ph.hu, (4.0, 3.0, 3.0), phantom_label(ph), 1.0) for ph in pair]
    assert len(crops) == sum(len(c.malignant) for c in direct) >= len(pair)
    assert sum(labels) == sum(sum(c.malignant.values()) for c in direct) > 0


def _nodal(*args):
    res = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", *map(str, args)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.slow
def test_evaluate_data_scores_both_formats_alike(tmp_path):
    geometry = ["--rows", 128, "--slices", 20, "--pixel-spacing", 1.25, "--slice-spacing", 2.5]
    results = {}
    for fmt in ("nnunet", "dicom-seg"):
        _nodal(
            "phantom", "--seed", 1_000_000, "--count", 2, "--format", fmt, *geometry, "--out", tmp_path / fmt
        )
        results[fmt] = json.loads(_nodal("evaluate", "--data", tmp_path / fmt, "--json"))
    nn, seg = results["nnunet"], results["dicom-seg"]
    spec = phantoms.PhantomSpec(rows=128, columns=128, pixel_spacing_mm=1.25, slices=20, slice_spacing_mm=2.5)
    truth = [phantoms.generate(s, spec) for s in (1_000_000, 1_000_001)]
    assert nn["data"] == {"layout": "nnunet", "split": "train", "cases": 2}
    assert nn["hit_rule"] == {"min_iou": HIT_MIN_IOU}
    assert seg["data"]["layout"] == "dicom-seg"
    assert nn["nodes"] == seg["nodes"] == sum(len(ph.nodes) for ph in truth)
    assert nn["malignant_nodes"] == sum(n.malignant for ph in truth for n in ph.nodes)
    assert nn["sensitivity"] > 0 and nn["dice"] > 0.5  # the demo model finds the larger nodes
    # the same phantoms through either format: the same scores
    for key in ("nodes_short_axis_ge_5mm", "sensitivity", "fp_per_volume", "threshold_baseline"):
        assert nn[key] == seg[key], key
    assert nn["dice"] == pytest.approx(seg["dice"], abs=0.01)
