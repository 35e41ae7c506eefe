"""One reconstruction of each scan: which series reconstruct one scan, and which of them is analysed."""

from dataclasses import replace

from dicom_node.completion.reconstructions import Reconstruction, choose, covers, is_sharp
from dicom_node.config import SHARP_KERNELS

THIN = Reconstruction(
    series_uid="1.2.3.1",
    frame_of_reference_uid="1.2.3.99",
    acquired=(1000.0, 1012.0),
    extent=(-400.0, -100.0),
    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    kernel="Br40d",
    description="Thorax 1.0 Br40",
    slice_thickness_mm=1.0,
    slices=300,
)
THICK = replace(THIN, series_uid="1.2.3.2", description="Thorax 5.0 Br40", slice_thickness_mm=5.0, slices=60)
LUNG = replace(THIN, series_uid="1.2.3.3", kernel="Bl57d", description="Lunge 1.0 Bl57")
VENOUS = replace(THIN, series_uid="1.2.3.4", acquired=(1070.0, 1082.0))  # the next phase


def chosen(series, sharp=SHARP_KERNELS, thin_mm=2.5):
    return {uid: r.series_uid for uid, r in choose(series, sharp, thin_mm).items()}


def test_thin_slices_are_analysed_of_a_thin_and_a_thick_reconstruction():
    assert covers(THIN, THICK) and covers(THICK, THIN)
    assert chosen([THICK, THIN]) == {THIN.series_uid: THIN.series_uid, THICK.series_uid: THIN.series_uid}


def test_thin_before_thick_whatever_the_kernel_then_soft_tissue_before_lung():
    """The model misses small nodes on thick slices: a thin lung-kernel series is chosen
    before a thick soft-tissue one; among thin ones the soft-tissue kernel, even if thicker."""
    assert chosen([LUNG, THICK])[THICK.series_uid] == LUNG.series_uid
    assert chosen([LUNG, THICK], thin_mm=0.5)[LUNG.series_uid] == THICK.series_uid  # both thick: kernel
    soft = replace(THIN, series_uid="1.2.3.9", slice_thickness_mm=2.0, description="Thorax 2.0")
    assert chosen([LUNG, soft])[LUNG.series_uid] == soft.series_uid
    assert set(chosen([LUNG, THIN, THICK]).values()) == {THIN.series_uid}
    at_limit = replace(LUNG, slice_thickness_mm=2.5)  # up to the limit counts as thin
    assert chosen([at_limit, replace(soft, slice_thickness_mm=3.0)])[soft.series_uid] == LUNG.series_uid
    unknown = replace(THIN, series_uid="1.2.3.10", slice_thickness_mm=None)
    assert chosen([unknown, THICK])[unknown.series_uid] == THICK.series_uid  # then the thinnest known


def test_original_before_derived():
    derived = replace(
        THIN, series_uid="1.2.3.5", image_type=("DERIVED", "SECONDARY", "AXIAL"), slice_thickness_mm=0.6
    )
    assert chosen([derived, THICK])[derived.series_uid] == THICK.series_uid


def test_phases_of_one_session_are_separate_scans():
    assert not covers(THIN, VENOUS)  # same frame of reference, later acquisition
    assert chosen([THIN, VENOUS]) == {THIN.series_uid: THIN.series_uid, VENOUS.series_uid: VENOUS.series_uid}


def test_regions_of_one_spiral_are_separate_scans():
    """Chest and abdomen reconstructed apart from one acquisition: one frame of reference,
    one time (some scanners stamp every image with the scan's start), other stretches of body."""
    abdomen = replace(THICK, series_uid="1.2.3.8", extent=(-700.0, -380.0))
    assert not covers(THIN, abdomen) and not covers(abdomen, THIN)
    assert chosen([THIN, abdomen])[abdomen.series_uid] == abdomen.series_uid
    part = replace(THICK, extent=(-350.0, -110.0))  # a thick reconstruction of part of the scan
    assert covers(THIN, part)  # all of it within the thin one's stretch
    assert not covers(THIN, replace(THICK, extent=(-150.0, 90.0)))  # 50 of its 240 mm


def test_a_partial_reconstruction_never_answers_for_the_whole():
    """A thin lung reconstruction of the chest beside a thick one of chest, abdomen and
    pelvis: the thin one is preferred, but the thick one is analysed too (the abdomen is in
    no other series); a thin abdomen beside them changes nothing for the thick one."""
    body = replace(THICK, series_uid="1.2.3.20", extent=(-700.0, 100.0), slice_thickness_mm=5.0)
    chest = replace(LUNG, series_uid="1.2.3.21", extent=(-400.0, -100.0))
    abdomen = replace(THIN, series_uid="1.2.3.22", extent=(-700.0, -380.0))
    assert covers(body, chest) and not covers(chest, body)
    for series in ([body, chest], [body, chest, abdomen], [abdomen, chest, body]):
        assert set(chosen(series).values()) == {s.series_uid for s in series}  # each its own


def test_series_that_do_not_say_when_or_where_are_never_grouped():
    for unknown in (
        replace(THICK, acquired=None),
        replace(THICK, extent=None),
        replace(THICK, frame_of_reference_uid=None),
        replace(THICK, frame_of_reference_uid="1.2.3.98"),
        replace(THICK, extent=(-200.0, -200.0)),  # one slice position: where it lies is unknown
        replace(THICK, extent=(float("nan"), -100.0)),
    ):
        assert not covers(THIN, unknown)
        assert chosen([THIN, unknown])[unknown.series_uid] == unknown.series_uid


def test_the_choice_does_not_depend_on_order():
    a = replace(THICK, series_uid="1.2.3.6", acquired=(990.0, 1001.0))  # overlaps THIN only
    b = replace(THIN, series_uid="1.2.3.7", acquired=(1011.0, 1030.0), slice_thickness_mm=0.6)  # THIN only
    for order in ([a, THIN, b], [b, a, THIN], [THIN, b, a]):
        # b is preferred and answers for THIN; a overlaps b in time only through THIN: analysed too
        assert chosen(order) == {
            b.series_uid: b.series_uid,
            THIN.series_uid: b.series_uid,
            a.series_uid: a.series_uid,
        }
    twin = replace(THIN, series_uid="1.2.3.0")  # identical but for its UID
    assert set(chosen([THIN, twin]).values()) == set(chosen([twin, THIN]).values()) == {twin.series_uid}


def test_sharp_kernel_patterns_of_the_common_vendors():
    def sharp(kernel, description=""):
        return is_sharp(replace(THIN, kernel=kernel, description=description), SHARP_KERNELS)

    for kernel in ("B70f", "Br64d\\3", "Bl57d", "I70f", "Hr60", "LUNG", "BONEPLUS", "EDGE", "FC52", "FC86"):
        assert sharp(kernel), kernel
    for kernel in ("B30f", "Br40d\\3", "Bv36", "I31f", "STANDARD", "SOFT", "FC08", "FC18", "B"):
        assert not sharp(kernel), kernel
    assert sharp("", "Lung 1.0")  # the description where the series names no kernel
    assert not sharp("B30f", "Lung staging 1.0")  # not where it names one: a protocol's name
    assert not is_sharp(replace(THIN, kernel="B70f"), [])  # the patterns are the configuration's


def test_label_names_what_a_reason_needs():
    assert THICK.label() == "series 1.2.3.2 ('Thorax 5.0 Br40', 5 mm, kernel Br40d)"
    assert (
        replace(THICK, description="", slice_thickness_mm=None, kernel="").label()
        == "series 1.2.3.2 (no description)"
    )
