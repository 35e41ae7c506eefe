"""The inference tests: volumes, models, phantoms, training and evaluation; no network, no
database (the same wall as the package's)."""

import shutil

import pytest

from inference.model_store import DEFAULT_MODEL_DIR


@pytest.fixture
def model_copy(tmp_path):
    """A copy of the shipped demo model, to change and break."""
    return shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "m")
