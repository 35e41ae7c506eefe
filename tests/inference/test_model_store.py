"""Model directories: a card that names the weights and pins their checksums, or no model."""

import datetime
import json
import multiprocessing
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from inference.evaluate import HIT_MIN_IOU, hit_rule
from inference.model_store import (
    DEFAULT_MODEL_DIR,
    ModelCardError,
    evaluation_name,
    load_model,
    read_card,
    record_evaluation,
    set_checker,
    set_classifier,
    set_necks,
    set_plausibility,
    set_segmenter,
)
from inference.necks import Necks
from inference.plausibility import Rules


def test_shipped_demo_model_loads_and_says_what_it_is():
    model = load_model(DEFAULT_MODEL_DIR, "cpu")
    card = model.card
    assert card["not_for_clinical_use"] is True
    assert "synthetic" in card["training_data"] and "NOT for clinical use" in card["intended_use"]
    assert model.working_spacing > 0
    assert model.max_slice_spacing_mm == 2.5  # results of thicker CT say small nodes may be missed
    # each recorded figure says what a hit was, and that is the rule the evaluations use now
    assert card["evaluation"] and all(e["hit_rule"] == hit_rule() for e in card["evaluation"].values())


def test_missing_card_is_refused(model_copy):
    (model_copy / "model_card.json").unlink()
    with pytest.raises(ModelCardError, match=r"no model_card\.json"):
        read_card(model_copy)


@pytest.mark.parametrize("limit", [0, -1, "2.5", float("nan"), [2.5]])
def test_a_cards_slice_spacing_limit_must_be_a_number_above_0(model_copy, limit):
    card = json.loads((model_copy / "model_card.json").read_text())
    card["limits"]["max_slice_spacing_mm"] = limit
    (model_copy / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ModelCardError, match=r"limits\.max_slice_spacing_mm must be a number above 0"):
        read_card(model_copy)
    card["limits"] = None  # no limit: no remark
    (model_copy / "model_card.json").write_text(json.dumps(card))
    assert load_model(model_copy, "cpu").max_slice_spacing_mm is None


def test_missing_field_is_refused(model_copy):
    card = json.loads((model_copy / "model_card.json").read_text())
    del card["intended_use"]
    (model_copy / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ModelCardError, match="intended_use"):
        read_card(model_copy)


def test_changed_weights_are_refused(model_copy):
    with open(model_copy / "segmenter.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelCardError, match=r"checksum of segmenter\.pt"):
        load_model(model_copy, "cpu")


def test_missing_weights_are_refused(model_copy):
    (model_copy / "classifier.pt").unlink()
    with pytest.raises(ModelCardError, match=r"classifier\.pt named by the card is missing"):
        read_card(model_copy)


def test_an_evaluation_is_recorded_in_the_card_with_its_command(model_copy):
    """`nodal evaluate --record`: the headline figures, the command and the date go into the
    evaluated model's card (issue 15: the card carries its results per family)."""
    before = read_card(model_copy).get("evaluation", {})  # the shipped card's own results stay
    name = "heldout family, seeds 1000300-1000300"
    env = {**os.environ, "NODAL_INFERENCE__MODEL_DIR": str(model_copy)}
    args = ["evaluate", "--family", "heldout", "--cases", "1", "--seed", "1000300", "--json", "--record"]
    res = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", *args], capture_output=True, text=True, env=env
    )
    assert res.returncode == 0, res.stderr
    printed = json.loads(res.stdout)
    entry = read_card(model_copy)["evaluation"][name]
    assert entry["command"] == "nodal evaluate --family heldout --cases 1 --seed 1000300 --json"
    assert entry["date"] == datetime.date.today().isoformat()
    for key in ("sensitivity", "fp_per_volume", "auc", "nodes_short_axis_ge_5mm", "seeds"):
        assert entry[key] == printed[key], key
    assert entry["hit_rule"] == printed["hit_rule"] == {"min_iou": HIT_MIN_IOU}  # what a hit was
    assert load_model(model_copy, "cpu").card["evaluation"] == {**before, name: entry}

    again = record_evaluation(model_copy, name, {"sensitivity": 0.5}, "c", "d")
    assert read_card(model_copy)["evaluation"] == {**before, name: again}
    assert again == {"sensitivity": 0.5, "command": "c", "date": "d"}
    assert not list(model_copy.glob(".*.tmp"))  # the card is replaced in one step


def test_an_evaluation_on_a_sites_dataset_is_recorded_under_its_name_and_split(model_copy, tmp_path):
    env = {**os.environ, "NODAL_INFERENCE__MODEL_DIR": str(model_copy)}

    def nodal(*args):
        res = subprocess.run(
            [sys.executable, "-m", "dicom_node.cli", *map(str, args)], capture_output=True, text=True, env=env
        )
        assert res.returncode == 0, res.stderr
        return res.stdout

    geometry = ["--rows", 128, "--slices", 20, "--pixel-spacing", 1.25, "--slice-spacing", 2.5]
    data = tmp_path / "site-nodes"
    nodal("phantom", "--seed", 1_000_000, "--count", 1, "--format", "nnunet", *geometry, "--out", data)
    printed = json.loads(nodal("evaluate", "--data", data, "--json", "--record"))
    entry = read_card(model_copy)["evaluation"]["dataset site-nodes, train split"]
    assert entry["data"] == printed["data"] == {"layout": "nnunet", "split": "train", "cases": 1}
    assert entry["sensitivity"] == printed["sensitivity"]
    assert entry["command"] == f"nodal evaluate --data {data} --json"


def test_the_mask_threshold_is_the_models_unless_the_settings_give_one(model_copy):
    """The checker was fitted on the candidates at the card's threshold: the pipeline takes it
    from the card, and the configuration (`inference.threshold`) overrides it only when set."""
    import numpy as np

    from inference import phantoms
    from inference.evaluate import phantom_volume
    from inference.pipeline import PipelineSettings, detect, mask_threshold

    card = json.loads((model_copy / "model_card.json").read_text())
    card["segmenter"]["threshold"] = 0.9
    (model_copy / "model_card.json").write_text(json.dumps(card))
    model = load_model(model_copy, "cpu")
    assert model.threshold == 0.9 and load_model(DEFAULT_MODEL_DIR, "cpu").threshold == 0.5
    assert mask_threshold(PipelineSettings(), model) == 0.9
    assert mask_threshold(PipelineSettings(threshold=0.3), model) == 0.3

    spec = phantoms.PhantomSpec(rows=200, columns=200, pixel_spacing_mm=1.6, slices=40, slice_spacing_mm=3.0)
    volume = phantom_volume(phantoms.generate(11, spec))
    own = [m["volume_mm3"] for _, m in detect(volume, model)[0]]
    given = [m["volume_mm3"] for _, m in detect(volume, model, PipelineSettings(threshold=0.5))[0]]
    assert own and np.sum(own) < np.sum(given)  # a higher threshold: less of each candidate


def test_a_training_generator_evaluation_is_named_with_its_revision():
    """The same seeds of another generator revision are other phantoms: their figures get an
    entry of their own, and revision 1's entries keep their names."""
    train = {"family": "train", "seeds": [1000400, 1000439], "generator_revision": 2}
    assert evaluation_name(train) == "train family, seeds 1000400-1000439, revision 2"
    assert evaluation_name({**train, "generator_revision": 1}) == "train family, seeds 1000400-1000439"
    assert evaluation_name({"family": "heldout", "seeds": [1, 2]}) == "heldout family, seeds 1-2"


def test_a_new_version_drops_the_evaluations_of_the_model_it_replaces(model_copy):
    record_evaluation(model_copy, "train family, seeds 1-2", {"sensitivity": 0.9}, "c", "d")
    version = read_card(model_copy)["version"]

    set_checker(model_copy, threshold=0.5, version=version)  # the same version: figures kept
    assert "train family, seeds 1-2" in read_card(model_copy)["evaluation"]

    set_checker(model_copy, threshold=0.5, version=version + ".1")
    card = read_card(model_copy)
    assert card["version"] == version + ".1"
    assert "evaluation" not in card  # they measured the model before the change

    record_evaluation(model_copy, "train family, seeds 3-4", {"sensitivity": 0.8}, "c", "d")
    set_necks(model_copy, None, version=version + ".2")
    assert "evaluation" not in read_card(model_copy)


def test_other_plausibility_rules_drop_the_evaluations_and_the_same_rules_keep_them(model_copy):
    """The rules decide which candidates are reported, so figures measured under other rules
    are not the card's model's (written without a new version by `nodal plausibility`)."""
    rules = Rules.from_card(read_card(model_copy).get("plausibility")) or Rules()
    record_evaluation(model_copy, "train family, seeds 1-2", {"sensitivity": 0.9}, "c", "d")

    set_plausibility(model_copy, rules)  # what the card holds already
    assert "train family, seeds 1-2" in read_card(model_copy)["evaluation"]

    set_plausibility(model_copy, None)
    assert "evaluation" not in read_card(model_copy)


def test_a_checker_or_neck_change_without_a_version_drops_the_evaluations(model_copy):
    """A threshold or a neck split changes what is reported as much as a rule does; setting
    what the card holds already (or only the command that set it) keeps the figures."""
    name = "train family, seeds 1-2"
    threshold = read_card(model_copy)["checker"]["threshold"]
    record_evaluation(model_copy, name, {"sensitivity": 0.9}, "c", "d")
    set_checker(model_copy, threshold=threshold, command="nodal checker ... (again)")
    set_necks(model_copy, None)  # the shipped card has none
    assert name in read_card(model_copy)["evaluation"]

    set_checker(model_copy, threshold=0.4)
    assert "evaluation" not in read_card(model_copy)

    record_evaluation(model_copy, name, {"sensitivity": 0.9}, "c", "d")
    set_necks(model_copy, Necks(ratio=0.7, max_neck_mm=2.5, part_threshold=0.8))
    assert "evaluation" not in read_card(model_copy)


def test_classifier_mirror_images_are_set_in_the_card_and_drop_the_evaluations(model_copy):
    name = "train family, seeds 1-2"
    assert not load_model(model_copy, "cpu").classifier_flips  # the shipped card scores one view
    record_evaluation(model_copy, name, {"sensitivity": 0.9}, "c", "d")
    set_classifier(model_copy, False, command="nodal classifier ... off")  # as it is: figures kept
    assert name in read_card(model_copy)["evaluation"]

    entry = set_classifier(model_copy, True, version="9.9.9", command="nodal classifier ... on")
    assert entry["test_time_flips"] is True and entry["set"]["command"] == "nodal classifier ... on"
    card = read_card(model_copy)
    assert card["version"] == "9.9.9" and "evaluation" not in card
    assert load_model(model_copy, "cpu").classifier_flips

    record_evaluation(model_copy, name, {"sensitivity": 0.9}, "c", "d")
    set_classifier(model_copy, False)
    assert "evaluation" not in read_card(model_copy) and not load_model(model_copy, "cpu").classifier_flips

    from dicom_node.cli import main

    assert main(["classifier", "--model-dir", str(model_copy), "--test-time-flips", "on"]) == 0
    entry = read_card(model_copy)["classifier"]
    assert entry["test_time_flips"] is True
    assert entry["set"]["command"] == f"nodal classifier --model-dir {model_copy} --test-time-flips on"
    config = model_copy.parent / "node.yaml"
    config.write_text("{}\n")
    argv = ["--config", str(config), "classifier", "--model-dir", str(model_copy), "--test-time-flips", "off"]
    assert main([*argv, "--version", "9.9.9"]) == 0  # the config's local path is not recorded
    assert read_card(model_copy)["classifier"]["set"]["command"] == (
        f"nodal classifier --model-dir {model_copy} --test-time-flips off --version 9.9.9"
    )


def test_the_pipeline_scores_nodes_over_mirror_images_when_the_card_says_so(model_copy):
    from inference import phantoms
    from inference.evaluate import phantom_volume
    from inference.pipeline import analyse

    spec = phantoms.PhantomSpec(rows=200, columns=200, pixel_spacing_mm=1.6, slices=40, slice_spacing_mm=3.0)
    volume = phantom_volume(phantoms.generate(11, spec))
    one = analyse(volume, load_model(model_copy, "cpu")).findings.findings
    set_classifier(model_copy, True)
    eight = analyse(volume, load_model(model_copy, "cpu")).findings.findings
    assert one and len(one) == len(eight)
    p1, p8 = ([f.malignancy_probability for f in found] for found in (one, eight))
    assert p1 != p8  # the mean of eight views is not the one view's score
    unscored = [{**f.to_json(), "malignancy_probability": None} for f in one]
    assert unscored == [{**f.to_json(), "malignancy_probability": None} for f in eight]  # nothing else


def test_segmenter_mirror_images_are_set_in_the_card_checked_and_drop_the_evaluations(model_copy):
    name = "train family, seeds 1-2"
    assert load_model(model_copy, "cpu").segmenter_flips == ()  # the shipped card: the image alone
    record_evaluation(model_copy, name, {"sensitivity": 0.9}, "c", "d")
    set_segmenter(model_copy, [], command="nodal segmenter ... none")  # as it is: figures kept
    assert name in read_card(model_copy)["evaluation"]

    entry = set_segmenter(model_copy, [(2,), (1, 2)], version="9.9.9", command="nodal segmenter ... x,xy")
    assert entry["test_time_flips"] == [[2], [1, 2]] and entry["set"]["command"] == "nodal segmenter ... x,xy"
    card = read_card(model_copy)
    assert card["version"] == "9.9.9" and "evaluation" not in card
    assert load_model(model_copy, "cpu").segmenter_flips == ((2,), (1, 2))

    for bad in ([[3]], [[]], [[2, 2]], [[2], [2]], "x", [["x"]]):
        with pytest.raises(ModelCardError, match="test_time_flips"):
            set_segmenter(model_copy, bad)  # type: ignore[arg-type]
        card = json.loads((model_copy / "model_card.json").read_text())
        card["segmenter"]["test_time_flips"] = bad
        (model_copy / "model_card.json").write_text(json.dumps(card))
        with pytest.raises(ModelCardError, match="test_time_flips"):
            load_model(model_copy, "cpu")
    set_segmenter(model_copy, [])
    assert "test_time_flips" not in read_card(model_copy)["segmenter"]

    from dicom_node.cli import main, mirror_axes

    assert mirror_axes("x, yx,z") == [(2,), (1, 2), (0,)] and mirror_axes("none") == []
    with pytest.raises(ValueError):
        mirror_axes("x,,y")
    assert main(["segmenter", "--model-dir", str(model_copy), "--test-time-flips", "x"]) == 0
    entry = read_card(model_copy)["segmenter"]
    assert entry["test_time_flips"] == [[2]] and entry["set"]["command"].startswith("nodal segmenter")
    assert main(["segmenter", "--model-dir", str(model_copy), "--test-time-flips", "w"]) == 2


def test_the_segmenter_probability_is_averaged_over_its_mirror_images():
    """A network that adds a ramp along the columns to its input: on an image symmetric in x
    the plain probability is not, and averaged with the left-right mirror image it is."""
    from inference.segment import node_probability

    class Ramp(torch.nn.Module):
        def forward(self, x):
            return x * 0 + torch.linspace(-3, 3, x.shape[-1])

    image = np.zeros((8, 8, 10), np.float32)
    plain = node_probability(Ramp(), image, torch.device("cpu"), roi=8)
    mirrored = node_probability(Ramp(), image, torch.device("cpu"), roi=8, flips=((2,),))
    assert not np.allclose(plain, plain[:, :, ::-1])
    assert np.allclose(mirrored, mirrored[:, :, ::-1])
    assert np.allclose(mirrored, (plain + plain[:, :, ::-1]) / 2, atol=1e-6)

    class Identity(torch.nn.Module):  # the input as logits: each mirror image flipped back agrees
        def forward(self, x):
            return x

    ramp = np.broadcast_to(np.linspace(-200, 200, 10, dtype=np.float32), (8, 8, 10))
    plain = node_probability(Identity(), ramp, torch.device("cpu"), roi=8)
    assert not np.allclose(plain, plain[:, :, ::-1])
    for flips in (((2,),), ((2,), (0, 1), (0, 1, 2))):
        assert np.allclose(
            node_probability(Identity(), ramp, torch.device("cpu"), roi=8, flips=flips), plain, atol=1e-6
        )


def test_a_change_that_fails_writes_nothing(model_copy, tmp_path):
    without = tmp_path / "without-checker"
    without.mkdir()
    card = read_card(model_copy)
    card["weights"].pop("checker")
    card.pop("checker")
    for entry in card["weights"].values():
        (without / entry["file"]).write_bytes((model_copy / entry["file"]).read_bytes())
    (without / "model_card.json").write_text(json.dumps(card))
    before = (model_copy / "model_card.json").read_bytes()
    with pytest.raises(ModelCardError, match="no checker to take"):
        set_checker(model_copy, threshold=0.4, source=without)
    with pytest.raises(ValueError, match="between 0 and 1"):
        set_checker(model_copy, threshold=1.5)
    assert (model_copy / "model_card.json").read_bytes() == before


def test_a_change_to_a_missing_model_directory_says_so(tmp_path):
    with pytest.raises(ModelCardError, match="no model directory"):
        set_plausibility(tmp_path / "nowhere", None)


def _record_many(model_dir, worker):
    for i in range(6):
        record_evaluation(model_dir, f"worker {worker}, run {i}", {"sensitivity": i / 10}, "c", "d")


def test_evaluations_recorded_at_once_by_several_processes_all_land(model_copy):
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_record_many, args=(model_copy, w)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(120)
        assert p.exitcode == 0
    names = read_card(model_copy)["evaluation"].keys()
    assert {f"worker {w}, run {i}" for w in range(4) for i in range(6)} <= names
    assert not list(model_copy.glob(".*.tmp"))
