"""Fixtures of the result-object tests."""

from __future__ import annotations

import pytest

from tests.helpers.sr_case import Case, make_case


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    """A small CT series with ellipsoid nodes and its findings, once per test module."""
    return make_case(tmp_path_factory.mktemp("case"))
