"""Completion analyses one reconstruction of each scan: instances received, indexed, routed."""

from sqlalchemy import select

from dicom_node.index.db import Job, JobState, Series
from tests.helpers.node import complete, receive, settings

SCAN = {"FrameOfReferenceUID": "1.2.3.99", "AcquisitionDate": "20260301", "ConvolutionKernel": "Br40d"}
THICK = {"series": "1.2.3.4", "description": "Thorax 5.0", "SliceThickness": "5", **SCAN}
THIN = {"series": "1.2.3.5", "description": "Thorax 1.0", "SliceThickness": "1", **SCAN}
NOT_THIN = (
    "another reconstruction of the same scan is analysed: series 1.2.3.5 ('Thorax 1.0', 1 mm, kernel Br40d)"
)


def jobs(db) -> dict[str, Job]:
    with db.session() as s:
        return {j.series_uid: j for j in s.scalars(select(Job).order_by(Job.id))}


def test_of_a_thin_and_a_thick_reconstruction_the_thin_one_is_analysed(node):
    db, receiver, _ = node
    receive(receiver, n=3, AcquisitionTime="101530", **THICK)
    receive(receiver, n=6, AcquisitionTime="101532", **THIN)
    receive(receiver, n=3, first=4, AcquisitionTime="101540", **THICK)  # the span: 10:15:30-40
    complete(db, settings())
    found = jobs(db)
    assert found["1.2.3.5"].state == JobState.QUEUED
    assert (found["1.2.3.4"].state, found["1.2.3.4"].reason) == (JobState.SKIPPED, NOT_THIN)
    with db.session() as s:
        thick = s.get(Series, "1.2.3.4")
        assert (thick.acquired_from, thick.acquired_to) == (1772360130.0, 1772360140.0)
        assert (thick.frame_of_reference_uid, thick.kernel, thick.routing) == ("1.2.3.99", "Br40d", NOT_THIN)


def test_a_later_thick_reconstruction_is_skipped_a_later_thin_one_analysed(node):
    db, receiver, _ = node
    receive(receiver, AcquisitionTime="101530", **THIN)
    complete(db, settings())
    receive(receiver, AcquisitionTime="101530", **THICK)
    complete(db, settings())
    assert jobs(db)["1.2.3.4"].reason == NOT_THIN
    receive(receiver, AcquisitionTime="101530", **{**THIN, "series": "1.2.3.3", "SliceThickness": "0.6"})
    complete(db, settings())
    assert jobs(db)["1.2.3.3"].state == JobState.QUEUED  # the thin one's results stand as sent


def test_phases_without_one_per_scan_and_series_that_do_not_say_when_are_all_analysed(node):
    db, receiver, _ = node
    receive(receiver, AcquisitionTime="101530", **THIN)
    receive(receiver, AcquisitionTime="101630", **THICK)  # a minute later: the next phase
    receive(receiver, **{**THIN, "series": "1.2.3.6"})  # no acquisition time
    complete(db, settings())
    assert {uid: j.state for uid, j in jobs(db).items()} == dict.fromkeys(
        ["1.2.3.4", "1.2.3.5", "1.2.3.6"], JobState.QUEUED
    )


def test_one_per_scan_off_analyses_every_selected_reconstruction(node):
    db, receiver, _ = node
    receive(receiver, AcquisitionTime="101530", **THIN)
    receive(receiver, AcquisitionTime="101530", **THICK)
    complete(db, settings(routing={"rules": [{"name": "ct", "min_slices": 3}], "one_per_scan": False}))
    assert {j.state for j in jobs(db).values()} == {JobState.QUEUED}
