"""The coded concepts: defined once, SNOMED as SCT, the values the design names."""

from __future__ import annotations

import importlib.metadata

import pytest
from pydicom.sr.codedict import codes as pydicom_codes
from pydicom.sr.coding import Code

from sr_templates import codes


def _all_codes() -> dict[str, Code]:
    return {name: value for name, value in vars(codes).items() if isinstance(value, Code)}


def test_no_retired_srt_scheme() -> None:
    assert all(c.scheme_designator != "SRT" for c in _all_codes().values())


@pytest.mark.parametrize(
    ("name", "value", "scheme"),
    [
        ("LYMPH_NODE", "59441001", "SCT"),
        ("ANATOMICAL_STRUCTURE", "91723000", "SCT"),
        ("SHORT_AXIS", "103340004", "SCT"),
        ("LONG_AXIS", "103339001", "SCT"),
        ("VOLUME", "118565006", "SCT"),
        ("MALIGNANT", "21594007", "SCT"),
        ("BENIGN", "30807003", "SCT"),
        ("PROBABILITY_OF_CANCER", "111047", "DCM"),
        ("ARTIFICIAL_INTELLIGENCE", "123110", "DCM"),
        ("FINDING_SITE", "363698007", "SCT"),
        ("SIZE_CATEGORY", "112025", "DCM"),
        ("UCUM_MM", "mm", "UCUM"),
        ("UCUM_MM3", "mm3", "UCUM"),
        ("UCUM_NO_UNITS", "1", "UCUM"),
        ("QUALITATIVE_EVALUATIONS", "C0034375", "UMLS"),
    ],
)
def test_design_codes(name: str, value: str, scheme: str) -> None:
    code = getattr(codes, name)
    assert (code.value, code.scheme_designator) == (value, scheme)


def test_standard_codes_agree_with_pydicoms_dictionary() -> None:
    """Every non-private code exists in pydicom's DICOM/SNOMED/UCUM dictionary."""
    known = {
        (c.value, c.scheme_designator)
        for scheme in ("SCT", "DCM", "UCUM", "LN")
        for c in (getattr(getattr(pydicom_codes, scheme), n) for n in dir(getattr(pydicom_codes, scheme)))
        if isinstance(c, Code)
    }
    # TID 1500 row 12's container concept (PS3.16; DCMTK's CODE_UMLS_QualitativeEvaluations),
    # which pydicom's small UMLS subset lacks
    known.add(("C0034375", "UMLS"))
    for name, code in _all_codes().items():
        if code.scheme_designator != codes.PRIVATE_SCHEME:
            assert (code.value, code.scheme_designator) in known, name


@pytest.mark.parametrize(
    ("category", "expected"),
    [
        ("normal (<10 mm)", codes.NORMAL),
        ("Normal", codes.NORMAL),
        ("pathological non-target (10-15 mm)", codes.ENLARGED),
        (" enlarged ", codes.ENLARGED),
        ("pathological target (>=15 mm)", codes.TARGET_NODE),
        ("measurable", codes.TARGET_NODE),
    ],
)
def test_size_categories(category: str, expected: Code) -> None:
    assert codes.size_category_code(category) == expected


def test_every_rule_category_has_its_own_code() -> None:
    """The categories `inference.rules` reports map to three different codes."""
    from inference import rules

    mapped = [codes.size_category_code(c) for c in rules.SIZE_CATEGORIES]
    assert len(set(mapped)) == len(rules.SIZE_CATEGORIES)


def test_unknown_size_category_gets_a_valid_private_code() -> None:
    code = codes.size_category_code("very large / bulky conglomerate of nodes")
    assert code.scheme_designator == codes.PRIVATE_SCHEME
    assert len(code.value) <= 16 and code.value.replace("-", "").isalnum()
    assert code.meaning.startswith("very large")
    assert codes.uses_private_scheme(code)
    assert len(codes.TARGET_NODE.value) <= 16
    with pytest.raises(ValueError, match="empty"):
        codes.size_category_code("  ")


def test_product_identity() -> None:
    assert codes.MANUFACTURER == "nodal project"
    assert codes.MODEL_NAME == "nodal"
    assert importlib.metadata.version("nodal") == codes.SOFTWARE_VERSION


def test_software_version_falls_back_when_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert codes.software_version() == codes.UNKNOWN_VERSION


def test_private_scheme_is_declared() -> None:
    item = codes.private_coding_scheme()
    assert item.CodingSchemeDesignator == codes.PRIVATE_SCHEME
