"""One reconstruction of each scan: which series reconstruct one scan, and which of them is analysed."""

from dataclasses import replace

from dicom_node.completion.reconstructions import Reconstruction, choose, is_sharp, same_scan
from dicom_node.config import SHARP_KERNELS

THIN = Reconstruction(
    series_uid="1.2.3.1",
    frame_of_reference_uid="1.2.3.99",
    acquired=(1000.0, 1012.0),
    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    kernel="Br40d",
    description="Thorax 1.0 Br40",
    slice_thickness_mm=1.0,
    slices=300,
)
THICK = replace(THIN, series_uid="1.2.3.2", description="Thorax 5.0 Br40", slice_thickness_mm=5.0, slices=60)
LUNG = replace(THIN, series_uid="1.2.3.3", kernel="Bl57d", description="Lunge 1.0 Bl57")
VENOUS = replace(THIN, series_uid="1.2.3.4", acquired=(1070.0, 1082.0))  # the next phase


def chosen(series, sharp=SHARP_KERNELS):
    return {uid: r.series_uid for uid, r in choose(series, sharp).items()}


def test_thin_slices_are_analysed_of_a_thin_and_a_thick_reconstruction():
    assert same_scan(THIN, THICK)
    assert chosen([THICK, THIN]) == {THIN.series_uid: THIN.series_uid, THICK.series_uid: THIN.series_uid}


def test_soft_tissue_kernel_before_a_lung_kernel_even_when_thicker():
    assert chosen([LUNG, THICK])[LUNG.series_uid] == THICK.series_uid
    assert chosen([LUNG, THIN, THICK]) == dict.fromkeys(
        [LUNG.series_uid, THIN.series_uid, THICK.series_uid], THIN.series_uid
    )


def test_original_before_derived():
    derived = replace(
        THIN, series_uid="1.2.3.5", image_type=("DERIVED", "SECONDARY", "AXIAL"), slice_thickness_mm=0.6
    )
    assert chosen([derived, THICK])[derived.series_uid] == THICK.series_uid


def test_phases_of_one_session_are_separate_scans():
    assert not same_scan(THIN, VENOUS)  # same frame of reference, later acquisition
    assert chosen([THIN, VENOUS]) == {THIN.series_uid: THIN.series_uid, VENOUS.series_uid: VENOUS.series_uid}


def test_series_that_do_not_say_when_or_where_are_never_grouped():
    for unknown in (
        replace(THICK, acquired=None),
        replace(THICK, frame_of_reference_uid=None),
        replace(THICK, frame_of_reference_uid="1.2.3.98"),
    ):
        assert not same_scan(THIN, unknown)
        assert chosen([THIN, unknown])[unknown.series_uid] == unknown.series_uid


def test_scans_join_transitively_and_the_choice_does_not_depend_on_order():
    a = replace(THICK, series_uid="1.2.3.6", acquired=(990.0, 1001.0))  # overlaps THIN only
    b = replace(THIN, series_uid="1.2.3.7", acquired=(1011.0, 1030.0), slice_thickness_mm=0.6)  # THIN only
    for order in ([a, THIN, b], [b, a, THIN], [THIN, b, a]):
        assert set(chosen(order).values()) == {b.series_uid}
    twin = replace(THIN, series_uid="1.2.3.0")  # identical but for its UID
    assert set(chosen([THIN, twin]).values()) == set(chosen([twin, THIN]).values()) == {twin.series_uid}


def test_sharp_kernel_patterns_of_the_common_vendors():
    def sharp(kernel, description=""):
        return is_sharp(replace(THIN, kernel=kernel, description=description), SHARP_KERNELS)

    for kernel in ("B70f", "Br64d\\3", "Bl57d", "I70f", "Hr60", "LUNG", "BONEPLUS", "EDGE", "FC52", "FC86"):
        assert sharp(kernel), kernel
    for kernel in ("B30f", "Br40d\\3", "Bv36", "I31f", "STANDARD", "SOFT", "FC08", "FC18", "B"):
        assert not sharp(kernel), kernel
    assert sharp("B30f", "Lung 1.0")  # the description counts too
    assert not is_sharp(replace(THIN, kernel="B70f"), [])  # the patterns are the configuration's


def test_label_names_what_a_reason_needs():
    assert THICK.label() == "series 1.2.3.2 ('Thorax 5.0 Br40', 5 mm, kernel Br40d)"
    assert (
        replace(THICK, description="", slice_thickness_mm=None, kernel="").label()
        == "series 1.2.3.2 (no description)"
    )
