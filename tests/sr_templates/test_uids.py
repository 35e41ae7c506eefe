"""Deterministic result UIDs: same input and model version, same UIDs; otherwise new ones."""

from __future__ import annotations

import pytest
from pydicom.uid import UID, generate_uid

from sr_templates import uids

SOURCES = [f"1.2.826.0.1.3680043.8.498.{n}" for n in range(1, 6)]


def test_same_input_same_uid_in_any_order() -> None:
    a = uids.result_uid(SOURCES, "1.0.0", uids.SEG_INSTANCE)
    b = uids.result_uid(list(reversed(SOURCES)) + SOURCES[:2], "1.0.0", uids.SEG_INSTANCE)
    assert a == b


def test_uids_are_valid_2_25_uids() -> None:
    uid = uids.result_uid(SOURCES, "1.0.0", uids.SR_INSTANCE)
    assert uid.startswith("2.25.") and UID(uid).is_valid and len(uid) <= 64
    assert uid[5] != "0"  # no leading zero in the integer component


def test_any_change_gives_another_uid() -> None:
    base = uids.result_uid(SOURCES, "1.0.0", uids.SEG_INSTANCE)
    assert uids.result_uid(SOURCES[:-1], "1.0.0", uids.SEG_INSTANCE) != base
    assert uids.result_uid(SOURCES, "1.0.1", uids.SEG_INSTANCE) != base
    assert uids.result_uid(SOURCES, "1.0.0", uids.SEG_SERIES) != base
    assert uids.result_uid(SOURCES, "1.0.0", uids.sc_instance(1)) != uids.result_uid(
        SOURCES, "1.0.0", uids.sc_instance(2)
    )


def test_result_uids_bundle() -> None:
    bundle = uids.ResultUIDs(SOURCES, "2.0")
    values = [bundle.seg_series, bundle.seg_instance, bundle.sr_series, bundle.sr_instance]
    values += [bundle.sc_series, bundle.sc_instance(1), bundle.sc_instance(2)]
    assert len(set(values)) == len(values)
    assert bundle.seg_instance == uids.result_uid(SOURCES, "2.0", uids.SEG_INSTANCE)


def test_device_uid_changes_with_the_model_version() -> None:
    assert uids.device_uid("m", "1") == uids.device_uid("m", "1")
    assert uids.device_uid("m", "1") != uids.device_uid("m", "2")


def test_pydicom_ignores_entropy_without_a_prefix() -> None:
    """Why uids.py derives the UUID itself: this pydicom call is random, not derived."""
    a = generate_uid(prefix=None, entropy_srcs=["same"])
    b = generate_uid(prefix=None, entropy_srcs=["same"])
    assert a != b


def test_refuses_empty_input() -> None:
    with pytest.raises(ValueError):
        uids.result_uid([], "1", uids.SEG_INSTANCE)
    with pytest.raises(ValueError):
        uids.result_uid(SOURCES, "1", "")
    with pytest.raises(ValueError):
        uids.sc_instance(0)
