"""Prior CT to current CT (`inference.followup.registration`) on a re-positioned phantom."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from inference.evaluate import array_volume
from inference.followup import FollowUpError, FollowUpSettings
from inference.followup.registration import register
from inference.phantom_pairs import make_pair
from tests.inference.test_phantom_pairs import SEED, SPEC


@pytest.fixture(scope="module")
def pair():
    return make_pair(SEED, "stable", SPEC)


def _volumes(pair):
    prior = array_volume(pair.prior.hu.astype(np.float32), pair.prior.affine, "reg-test", "prior")
    current = array_volume(pair.current.hu.astype(np.float32), pair.current.affine, "reg-test", "current")
    return prior, current


def _error_at_nodes(pair, matrix) -> float:
    m = np.asarray(matrix)
    centres = np.array([n.centre_lps_mm for n in pair.prior.nodes])
    by_reg = centres @ m[:3, :3].T + m[:3, 3]
    true = centres @ pair.motion[:3, :3].T + pair.motion[:3, 3]
    return float(np.linalg.norm(by_reg - true, axis=1).max())


def test_recovers_the_motion_within_2mm(pair) -> None:
    shift = np.linalg.norm(pair.motion[:3, 3])
    assert shift > 5  # the patient really moved
    reg = register(*_volumes(pair))
    assert reg.method in ("rigid", "affine"), reg.note
    assert _error_at_nodes(pair, reg.matrix) < 2.0
    assert reg.bone_residual_mm is not None and reg.bone_residual_mm < 3.0
    assert reg.metric is not None and reg.metric < 0  # Mattes MI: more negative is better
    # unregistered, the nodes would be as far off as the patient moved
    assert _error_at_nodes(pair, np.eye(4)) > 5


def test_rigid_only_and_off(pair) -> None:
    prior, current = _volumes(pair)
    rigid = register(prior, current, FollowUpSettings(registration="rigid"))
    assert rigid.method == "rigid" and _error_at_nodes(pair, rigid.matrix) < 2.0
    off = register(prior, current, FollowUpSettings(registration="none"))
    assert off.method == "identity" and "switched off" in off.note


def test_no_body_falls_back_with_the_reason(pair) -> None:
    prior, current = _volumes(pair)
    empty = replace(prior, array=np.full(prior.shape, -1000.0, np.float32))
    reg = register(empty, current)
    assert reg.method == "identity" and "too little body" in reg.note
    assert reg.matrix == tuple(tuple(float(v) for v in row) for row in np.eye(4))


def test_bad_volumes_are_clear_errors(pair) -> None:
    prior, current = _volumes(pair)
    with pytest.raises(FollowUpError, match="must be a 3D volume"):
        register(replace(prior, array=prior.array[0]), current)
    with pytest.raises(FollowUpError, match="not finite"):
        bad = prior.array.copy()
        bad[0, 0, 0] = np.nan
        register(replace(prior, array=bad), current)


def test_same_inputs_same_transform(pair) -> None:
    prior, current = _volumes(pair)
    first, second = register(prior, current), register(prior, current)
    assert first.matrix == second.matrix and first.bone_residual_mm == second.bone_residual_mm
