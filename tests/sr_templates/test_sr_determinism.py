"""Re-running on the same input gives the same UIDs; other input or model, other UIDs."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from inference.findings import ModelInfo
from sr_templates import build_results
from tests.helpers.sr_case import make_case


def _uids(results) -> list[tuple[str, str]]:
    datasets = [results.seg, results.sr, *results.result_images]
    return [(ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in datasets]


def test_same_input_twice_gives_the_same_uids(case) -> None:
    first = _uids(build_results(case.datasets, case.findings))
    assert first == _uids(build_results(case.datasets, case.findings))
    shuffled = list(case.datasets)
    random.Random(3).shuffle(shuffled)
    assert first == _uids(build_results(shuffled, case.findings))
    instances = [sop for _, sop in first]
    assert len(set(instances)) == len(instances)
    assert len({series for series, _ in first}) == 3  # SEG, SR, result images


def test_another_model_version_gives_new_uids(case) -> None:
    other = dataclasses.replace(case.findings, model=ModelInfo(name="nodal-ln-test", version="9"))
    a = {u for pair in _uids(build_results(case.datasets, case.findings)) for u in pair}
    b = {u for pair in _uids(build_results(case.datasets, other)) for u in pair}
    assert a.isdisjoint(b)


def test_other_input_gives_new_uids(case, tmp_path: Path) -> None:
    other = make_case(tmp_path, uid_seed="another-series")
    a = {u for pair in _uids(build_results(case.datasets, case.findings)) for u in pair}
    b = {u for pair in _uids(build_results(other.datasets, other.findings)) for u in pair}
    assert a.isdisjoint(b)
