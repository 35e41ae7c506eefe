"""Completion analyses one reconstruction of each scan: instances received, indexed, routed."""

import time

from sqlalchemy import select

from dicom_node.completion.quiet import reprocess_study
from dicom_node.index.db import Job, JobState, Series, Study
from dicom_node.jobs.table import claim, finish_done, finish_error, reprocess_summary
from dicom_node.observe import metrics
from dicom_node.receive.contract import Source
from tests.helpers.dicom import enhanced_ct
from tests.helpers.node import complete, later, outcome, receive, settings

STUDY = "1.2.3"  # part10's
SCAN = {
    "FrameOfReferenceUID": "1.2.3.99",
    "AcquisitionDate": "20260301",
    "ConvolutionKernel": "Br40d",
    "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
}
THICK = {"series": "1.2.3.4", "description": "Thorax 5.0", "SliceThickness": "5", **SCAN}
THIN = {"series": "1.2.3.5", "description": "Thorax 1.0", "SliceThickness": "1", **SCAN}
NOT_THIN = (
    "another reconstruction of the same scan is analysed: series 1.2.3.5 ('Thorax 1.0', 1 mm, kernel Br40d)"
)


def send(receiver, n=4, first=1, z=-200.0, step=25.0, **kw):
    """`n` instances of a series, their slices `step` mm apart from `z` down (on 1.2.3.99)."""
    for i in range(n):
        receive(receiver, n=1, first=first + i, ImagePositionPatient=[0, 0, z - i * step], **kw)


def jobs(db) -> dict[str, Job]:
    with db.session() as s:
        return {j.series_uid: j for j in s.scalars(select(Job).order_by(Job.id))}


def test_of_a_thin_and_a_thick_reconstruction_the_thin_one_is_analysed(node):
    db, receiver, _ = node
    send(receiver, n=3, z=-100.0, AcquisitionTime="101530", **THICK)
    send(receiver, n=6, z=-100.0, AcquisitionTime="101532", **THIN)
    send(receiver, n=3, first=4, z=-175.0, AcquisitionTime="101540", **THICK)  # 10:15:30-40, -225 to -100 mm
    complete(db, settings())
    found = jobs(db)
    assert found["1.2.3.5"].state == JobState.QUEUED
    assert (found["1.2.3.4"].state, found["1.2.3.4"].reason) == (JobState.SKIPPED, NOT_THIN)
    with db.session() as s:
        thick = s.get(Series, "1.2.3.4")
        assert (thick.acquired_from, thick.acquired_to) == (1772360130.0, 1772360140.0)
        assert (thick.extent_from, thick.extent_to) == (-225.0, -100.0)
        assert (thick.frame_of_reference_uid, thick.kernel, thick.routing) == ("1.2.3.99", "Br40d", NOT_THIN)


def test_a_later_thick_reconstruction_is_skipped_a_later_thin_one_analysed(node):
    db, receiver, _ = node
    send(receiver, AcquisitionTime="101530", **THIN)
    complete(db, settings())
    send(receiver, AcquisitionTime="101530", **THICK)
    complete(db, settings())
    assert jobs(db)["1.2.3.4"].reason == NOT_THIN
    send(receiver, AcquisitionTime="101530", **{**THIN, "series": "1.2.3.3", "SliceThickness": "0.6"})
    complete(db, settings())
    assert jobs(db)["1.2.3.3"].state == JobState.QUEUED  # the thin one's results stand as sent


def test_phases_without_one_per_scan_and_series_that_do_not_say_when_are_all_analysed(node):
    db, receiver, _ = node
    send(receiver, AcquisitionTime="101530", **THIN)
    send(receiver, AcquisitionTime="101630", **THICK)  # a minute later: the next phase
    send(receiver, **{**THIN, "series": "1.2.3.6"})  # no acquisition time
    complete(db, settings())
    assert {uid: j.state for uid, j in jobs(db).items()} == dict.fromkeys(
        ["1.2.3.4", "1.2.3.5", "1.2.3.6"], JobState.QUEUED
    )


def test_one_per_scan_off_analyses_every_selected_reconstruction(node):
    db, receiver, _ = node
    send(receiver, AcquisitionTime="101530", **THIN)
    send(receiver, AcquisitionTime="101530", **THICK)
    complete(db, settings(routing={"rules": [{"name": "ct", "min_slices": 3}], "one_per_scan": False}))
    assert {j.state for j in jobs(db).values()} == {JobState.QUEUED}


def test_when_the_chosen_reconstruction_gets_no_results_the_next_one_is_analysed(node):
    """The thin series is refused by the loader (say a missing slice): the thick one,
    skipped as another reconstruction, is routed again and analysed; the topogram, which no
    rule selected, is not routed again; nothing is chosen twice."""
    db, receiver, _ = node
    s = settings()
    send(receiver, AcquisitionTime="101530", **THICK)
    send(receiver, AcquisitionTime="101530", **THIN)
    receive(receiver, n=1, series="1.2.3.9", description="Topogram")
    complete(db, s)
    thick_skip = jobs(db)["1.2.3.4"]
    assert (thick_skip.state, thick_skip.rule) == (JobState.SKIPPED, "ct")  # selected, then skipped
    job = claim(db, "h:1:w0", 10, later())
    assert job.series_uid == "1.2.3.5"
    finish_error(db, job.id, "h:1:w0", "2 slices missing", s, later(), JobState.SKIPPED)
    [again] = complete(db, s)
    found = jobs(db)
    assert (found["1.2.3.4"].id, found["1.2.3.4"].state) == (again, JobState.QUEUED)
    assert found["1.2.3.5"].state == JobState.SKIPPED and found["1.2.3.5"].reason == "2 slices missing"
    assert found["1.2.3.9"].reason.endswith("1 slices, fewer than 3")  # its first and only job
    assert complete(db, s) == []


def test_routing_again_after_a_failure_is_not_a_completion(node):
    """Completions in real time (a quiet period of 1 ms): the fallback's routing is not counted as
    the study completing again; instances sent again are."""
    db, receiver, _ = node
    s = settings(completion={"quiet_seconds": 0.001, "after_release_seconds": 0.001})

    def now() -> float:
        time.sleep(0.01)  # past the quiet period
        return time.time()

    before = metrics.STUDIES_COMPLETED._value.get()
    send(receiver, AcquisitionTime="101530", **THICK)
    send(receiver, AcquisitionTime="101530", **THIN)
    complete(db, s, now())
    job = claim(db, "h:1:w0", 10, now())
    finish_error(db, job.id, "h:1:w0", "2 slices missing", s, now(), JobState.SKIPPED)
    assert len(complete(db, s, now())) == 1  # the thick one, routed again
    with db.session() as ses:
        assert ses.get(Study, STUDY).completions == 1
    send(receiver, n=1, first=20, AcquisitionTime="101530", **THIN)
    assert len(complete(db, s, now())) == 1
    with db.session() as ses:
        assert ses.get(Study, STUDY).completions == 2
    assert metrics.STUDIES_COMPLETED._value.get() - before == 2


def test_a_chosen_reconstruction_that_gives_up_hands_over_too_and_fresh_instances_bring_it_back(node):
    db, receiver, _ = node
    s = settings()  # 2 attempts
    send(receiver, AcquisitionTime="101530", **THICK)
    send(receiver, AcquisitionTime="101530", **THIN)
    complete(db, s)
    for _ in range(2):
        job = claim(db, "h:1:w0", 10, later() + 3600)
        finish_error(db, job.id, "h:1:w0", "worker out of memory", s, later(), None)
    assert jobs(db)["1.2.3.5"].state == JobState.FAILED
    complete(db, s)
    assert jobs(db)["1.2.3.4"].state == JobState.QUEUED
    send(receiver, n=1, first=20, AcquisitionTime="101530", **THIN)  # a late instance of the thin one
    complete(db, s)
    assert jobs(db)["1.2.3.5"].state == JobState.QUEUED  # preferred again: new instances, new chance


def test_a_failed_reconstruction_hands_over_only_to_the_skips_it_answered_for(node):
    """Two phases, each a thin and a thick series: the arterial thin one fails; only the
    arterial thick one is routed again, the venous pair keeps its jobs."""
    db, receiver, _ = node
    s = settings()
    send(receiver, AcquisitionTime="101530", **THICK)
    send(receiver, AcquisitionTime="101530", **THIN)
    venous = {"AcquisitionTime": "101630", "FrameOfReferenceUID": "1.2.3.99"}
    send(receiver, **{**THICK, **venous, "series": "1.2.3.6"})
    send(receiver, **{**THIN, **venous, "series": "1.2.3.7"})
    complete(db, s)
    before = {uid: j.id for uid, j in jobs(db).items()}
    assert {uid: j.state for uid, j in jobs(db).items()} == {
        "1.2.3.4": JobState.SKIPPED,
        "1.2.3.5": JobState.QUEUED,
        "1.2.3.6": JobState.SKIPPED,
        "1.2.3.7": JobState.QUEUED,
    }
    job = claim(db, "h:1:w0", 10, later(), job_id=before["1.2.3.5"])
    finish_error(db, job.id, "h:1:w0", "2 slices missing", s, later(), JobState.FAILED)
    complete(db, s)
    after = jobs(db)
    assert after["1.2.3.4"].state == JobState.QUEUED and after["1.2.3.4"].id != before["1.2.3.4"]
    assert {uid: after[uid].id for uid in ("1.2.3.6", "1.2.3.7")} == {
        uid: before[uid] for uid in ("1.2.3.6", "1.2.3.7")
    }


def test_reprocessing_tries_the_chosen_reconstruction_again_not_both(node):
    """After the thin series failed and the thick one was analysed in its place,
    reprocessing queues the thin one and skips the thick one again (not two result sets);
    if the thin one fails again, the thick one is analysed again."""
    db, receiver, _ = node
    s = settings()
    send(receiver, AcquisitionTime="101530", **THICK)
    send(receiver, AcquisitionTime="101530", **THIN)
    complete(db, s)
    job = claim(db, "h:1:w0", 10, later())
    finish_error(db, job.id, "h:1:w0", "worker out of memory", s, later(), JobState.FAILED)
    [stand_in] = complete(db, s)
    job = claim(db, "h:1:w0", 10, later(), job_id=stand_in)
    assert finish_done(db, job.id, "h:1:w0", outcome(job.id), s, later())

    created = reprocess_study(db, STUDY, receiver.spool.root, s.routing, later())
    by_series = {j.series_uid: j for j in created}
    assert by_series["1.2.3.5"].state == JobState.QUEUED
    assert (by_series["1.2.3.4"].state, by_series["1.2.3.4"].reason) == (JobState.SKIPPED, NOT_THIN)
    assert (
        reprocess_summary(created)
        == f"job(s) #{by_series['1.2.3.5'].id} queued, #{by_series['1.2.3.4'].id} skipped"
    )
    with db.session() as ses:
        assert ses.get(Job, stand_in).superseded_by == by_series["1.2.3.4"].id  # its results stay as sent
        assert ses.get(Series, "1.2.3.4").routing == NOT_THIN

    job = claim(db, "h:1:w0", 10, later(), job_id=by_series["1.2.3.5"].id)
    finish_error(db, job.id, "h:1:w0", "worker out of memory", s, later(), JobState.FAILED)
    [again] = complete(db, s)
    assert jobs(db)["1.2.3.4"].id == again and jobs(db)["1.2.3.4"].state == JobState.QUEUED


def test_reprocessing_with_one_per_scan_off_analyses_both(node):
    db, receiver, _ = node
    s = settings(routing={"rules": [{"name": "ct", "min_slices": 3}], "one_per_scan": False})
    send(receiver, AcquisitionTime="101530", **THIN)
    send(receiver, AcquisitionTime="101530", **THICK)
    complete(db, s)
    while (job := claim(db, "h:1:w0", 10, later())) is not None:
        assert finish_done(db, job.id, "h:1:w0", outcome(job.id), s, later())
    created = reprocess_study(db, STUDY, receiver.spool.root, s.routing, later())
    assert sorted((j.series_uid, j.state) for j in created) == [
        ("1.2.3.4", JobState.QUEUED),
        ("1.2.3.5", JobState.QUEUED),
    ]


def test_an_enhanced_ct_reconstruction_is_grouped_with_the_single_frame_ones_of_its_scan(node):
    """A thin Enhanced CT (one instance, 101 frames 1 mm apart, acquired over 10:15:29.5-31.5
    by its frames, though its Acquisition DateTime says 10:15:29) and a thick single-frame
    series of the same scan (10:15:30): the Enhanced CT is analysed, the thick one skipped."""
    db, receiver, _ = node
    send(receiver, n=5, z=-100.0, AcquisitionTime="101530", **THICK)  # -200 to -100 mm
    receiver.store_bytes(
        enhanced_ct(
            [-100.0 - i for i in range(101)],
            sop="1.2.3.8.1",
            series="1.2.3.8",
            SeriesDescription="Thorax 1.0 enhanced",
            FrameOfReferenceUID=SCAN["FrameOfReferenceUID"],
            AcquisitionDateTime="20260301101529",
            frame_times=["20260301101529.5", *["20260301101530.5"] * 99, "20260301101531.5"],
        ),
        Source("dimse", "a1", "CT1"),
    )
    receiver.flush()
    complete(db, settings(routing={"rules": [{"name": "ct", "min_slices": 3, "sop_classes": []}]}))
    found = jobs(db)
    assert found["1.2.3.8"].state == JobState.QUEUED, found["1.2.3.8"].reason
    assert found["1.2.3.4"].state == JobState.SKIPPED
    assert found["1.2.3.4"].reason.endswith("series 1.2.3.8 ('Thorax 1.0 enhanced', 1 mm, kernel Br40d)")


def test_a_skip_names_the_reconstruction_analysed_as_the_fallback_finds_it():
    from dicom_node.completion.quiet import reconstruction
    from dicom_node.jobs.table import names_analysed

    row = Series(series_uid="1.2.3.5", image_type="ORIGINAL", description="Thorax (1)", frame_count=3)
    reason = f"another reconstruction of the same scan is analysed: {reconstruction(row).label()}"
    assert names_analysed(reason, "1.2.3.5") and not names_analysed(reason, "1.2.3")


def test_a_slice_thickness_of_zero_is_unknown():
    from dicom_node.completion.quiet import reconstruction
    from dicom_node.index.db import Series

    row = Series(series_uid="1.2.3.4", image_type="ORIGINAL\\PRIMARY\\AXIAL", description="", frame_count=3)
    for value, expected in ((0.0, None), (None, None), (1.25, 1.25)):
        row.slice_thickness_mm = value
        assert reconstruction(row).slice_thickness_mm == expected
