"""`nodal evaluate-followup` (`inference.evaluate_followup`): the whole chain on one pair."""

from __future__ import annotations

import pytest

from inference.evaluate import HIT_MIN_IOU
from inference.evaluate_followup import FOLLOWUP_SEED_BASE, evaluate_followup
from inference.followup.response import CR, NE, NON_CR_NON_PD, PD, PR, SD
from inference.model_store import load_model
from tests.inference.test_phantom_pairs import SPEC


@pytest.mark.slow
def test_one_pair_end_to_end() -> None:
    result = evaluate_followup(load_model(device="cpu"), pairs=1, spec=SPEC)
    assert result["pairs"] == 1 and result["first_seed"] == FOLLOWUP_SEED_BASE
    assert result["hit_rule"] == {"min_iou": HIT_MIN_IOU}
    row = result["per_pair"][0]
    assert row["scenario"] == "progression"
    assert 0 <= row["matched_correctly"] <= row["found_in_both"] <= row["truth_in_both"]
    assert len(row["sa_change_errors_mm"]) == row["matched_correctly"]
    assert {row["response"], row["truth_response"]} <= {CR, PR, SD, PD, NON_CR_NON_PD, NE}
    assert row["registration"] in ("rigid", "affine", "identity")
    assert result["response_agreement"] == f"{int(row['response'] == row['truth_response'])}/1"
    without = int(row["response_without_look"] == row["truth_response"])
    assert result["response_agreement_without_look"] == f"{without}/1"
    assert row["response_look_unjudged"] == row["response"]  # the shipped model: no checker to judge
    assert result["response_agreement_look_unjudged"] == result["response_agreement"]
    assert set(row["looks"]) <= {"fat", "measured", "unclear"}


def test_bad_arguments() -> None:
    model = load_model(device="cpu")
    with pytest.raises(ValueError, match="pairs must be >= 1"):
        evaluate_followup(model, pairs=0)
    with pytest.raises(ValueError, match="evaluation seeds start"):
        evaluate_followup(model, pairs=1, seed=5)


def test_cli_parses_the_command() -> None:
    from dicom_node.cli import _parser

    args = _parser().parse_args(["evaluate-followup", "--pairs", "10", "--json"])
    assert (args.pairs, args.json, args.seed) == (10, True, None)
    assert args.func.__name__ == "cmd_evaluate_followup"
