"""Routing rules pick the series to analyse and say why others are skipped; completion by quiet period."""

import pytest

from dicom_node.completion.quiet import is_complete
from dicom_node.completion.routing import SeriesSummary, route
from dicom_node.config import RoutingRule, Settings

RULES = Settings().routing.rules
AXIAL = SeriesSummary(
    "CT", "1.2.840.10008.5.1.4.1.1.2", ("ORIGINAL", "PRIMARY", "AXIAL"), 2.5, "Thorax 2.5", 120
)


def with_(**kw) -> SeriesSummary:
    return SeriesSummary(**{**AXIAL.__dict__, **kw})


def test_axial_ct_is_selected_by_the_default_rule():
    d = route(AXIAL, RULES)
    assert d.selected and d.rule == "axial-ct"


def test_enhanced_ct_volume_is_selected():
    d = route(
        with_(sop_class_uid="1.2.840.10008.5.1.4.1.1.2.1", image_type=("DERIVED", "PRIMARY", "VOLUME")), RULES
    )
    assert d.selected and d.rule == "enhanced-ct"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"modality": "MR"}, "modality MR is not CT"),
        ({"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}, "lacks AXIAL"),
        ({"slice_thickness_mm": 8.0}, "slice thickness 8 mm outside 0-5 mm"),
        ({"slices": 12}, "12 slices, fewer than 20"),
        ({"description": "Topogram 0.6 T20f"}, "exclude pattern"),
        ({"sop_class_uid": "1.2.840.10008.5.1.4.1.1.66.4", "modality": "SEG"}, "modality SEG"),
    ],
)
def test_skipped_series_carry_the_reason(change, reason):
    d = route(with_(**change), RULES)
    assert not d.selected and d.rule is None
    assert reason in d.reason
    assert d.reason.startswith("axial-ct: ")


def test_include_patterns_and_thickness_bounds():
    rule = RoutingRule(name="soft", include_descriptions=["(?i)soft|weich"], min_slice_thickness_mm=1.0)
    assert route(with_(description="Thorax WEICH 2.5"), [rule]).selected
    assert "no include pattern" in route(AXIAL, [rule]).reason
    assert (
        "slice thickness unknown" in route(with_(description="soft", slice_thickness_mm=None), [rule]).reason
    )


def test_bad_regex_is_a_config_error():
    with pytest.raises(ValueError, match="not a regular expression"):
        RoutingRule(name="x", exclude_descriptions=["(unclosed"])


def test_quiet_period():
    assert not is_complete(100.0, None, False, 110.0, 30, 5)
    assert is_complete(100.0, None, True, 130.0, 30, 5)  # a sender that never releases still completes


def test_shorter_quiet_after_release():
    assert is_complete(100.0, 101.0, False, 106.0, 30, 5)
    assert not is_complete(100.0, 101.0, False, 105.0, 30, 5)
    assert not is_complete(100.0, 101.0, True, 106.0, 30, 5)  # another association still open
    assert not is_complete(102.0, 101.0, False, 107.0, 30, 5)  # released before the last instance
