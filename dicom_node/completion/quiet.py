"""Study completion: a study is complete after a quiet period since its last new instance.

The quiet period is `completion.quiet_seconds`, or the shorter `after_release_seconds`
once every association (or STOW-RS request) that brought the study has been released
normally. An aborted association does not count as released. The routing rules select
series, and of the selected series that reconstruct one scan only one is analysed
(`completion.reconstructions`). Only series with new instances since the last completion
get a new job: a late instance in an analysed series gives a new job that supersedes the
earlier one; our own results coming back from the PACS (SEG, SR, secondary capture) are
routed, skipped, and trigger nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.completion.reconstructions import Reconstruction, choose
from dicom_node.completion.routing import Decision, SeriesSummary, route
from dicom_node.config import RoutingSection, Settings
from dicom_node.index.db import Database, Job, JobState, Series, Study
from dicom_node.jobs.table import latest_jobs, reprocess, supersede_older, without_results
from dicom_node.observe import metrics
from dicom_node.observe.audit import study_key

log = logging.getLogger("nodal.completion")


def is_complete(
    last_received_at: float,
    released_at: float | None,
    transfer_open: bool,
    t: float,
    quiet_seconds: float,
    after_release_seconds: float,
) -> bool:
    quiet_for = t - last_received_at
    if quiet_for >= quiet_seconds:
        return True
    if transfer_open or released_at is None or released_at < last_received_at:
        return False
    return t - released_at >= after_release_seconds  # released after the last instance, and long enough ago


def _image_type(series: Series) -> tuple[str, ...]:
    return tuple(v for v in series.image_type.split("\\") if v)


def summary(series: Series) -> SeriesSummary:
    return SeriesSummary(
        modality=series.modality,
        sop_class_uid=series.sop_class_uid,
        image_type=_image_type(series),
        slice_thickness_mm=series.slice_thickness_mm,
        description=series.description,
        slices=series.frame_count,
    )


def complete_due_studies(
    db: Database,
    settings: Settings,
    open_studies: set[str],
    t: float,
    files_written: Callable[[], bool] = lambda: True,
) -> list[int]:
    """Complete every study whose quiet period is over; return the ids of the jobs created.
    `files_written` is called once before the first study is completed (the spool's files
    of everything acknowledged are written when it returns: jobs read them)."""
    c = settings.completion

    def due(study: Study | None) -> bool:
        return (
            study is not None
            and study.pending
            and is_complete(
                study.last_received_at,
                study.released_at,
                study.study_uid in open_studies,
                t,
                c.quiet_seconds,
                c.after_release_seconds,
            )
        )

    with db.session() as s:
        quiet = [
            study.study_uid for study in s.scalars(select(Study).where(Study.pending.is_(True))) if due(study)
        ]
    if quiet and not files_written():
        log.warning("spool files still being written after the wait; completing anyway")
    created: list[int] = []
    with db.session() as s:
        for uid in quiet:
            study = s.get(Study, uid, with_for_update=True)  # a worker's fallback locks it too
            if study is not None and due(study):  # again: an instance may have come in meanwhile
                created.extend(j.id for j in complete_study(s, study, settings, t))
    return created


def reconstruction(series: Series) -> Reconstruction:
    return Reconstruction(
        series_uid=series.series_uid,
        frame_of_reference_uid=series.frame_of_reference_uid,
        acquired=_span(series.acquired_from, series.acquired_to),
        extent=_span(series.extent_from, series.extent_to),
        image_type=_image_type(series),
        kernel=series.kernel or "",
        description=series.description,
        slice_thickness_mm=series.slice_thickness_mm if (series.slice_thickness_mm or 0) > 0 else None,
        slices=series.frame_count,
    )


def _span(low: float | None, high: float | None) -> tuple[float, float] | None:
    return None if low is None or high is None else (low, high)


def decisions(
    study_series: list[Series], routing: RoutingSection, unusable: AbstractSet[str] = frozenset()
) -> dict[str, Decision]:
    """The routing decision of each series of one study: its rules, then (with
    `one_per_scan`) one reconstruction of each scan among the series they select, whether
    or not those came in this completion (a later, better reconstruction is analysed too;
    a later, worse one is skipped). A series in `unusable` (its analysis failed, or the
    loader refused it, and nothing new came since) is chosen for no scan: the next
    reconstruction of its scan is."""
    routed = {series.series_uid: route(summary(series), routing.rules) for series in study_series}
    selected = [
        series
        for series in study_series
        if routed[series.series_uid].selected and series.series_uid not in unusable
    ]
    for uid, reason in answered_for(selected, routing).items():
        routed[uid] = Decision(False, routed[uid].rule, reason)
    return routed


def answered_for(selected: list[Series], routing: RoutingSection) -> dict[str, str]:
    """Of series selected for analysis, each that another reconstruction of its scan answers
    for (with `routing.one_per_scan`), and the reason it is skipped."""
    if not routing.one_per_scan:
        return {}
    chosen = choose([reconstruction(x) for x in selected], routing.sharp_kernels, routing.thin_slices_mm)
    return {
        uid: f"another reconstruction of the same scan is analysed: {by.label()}"
        for uid, by in chosen.items()
        if by.series_uid != uid
    }


def reprocess_study(
    db: Database, study_uid: str, spool_root: Path, routing: RoutingSection, t: float
) -> list[Job]:
    """`jobs.table.reprocess`, one reconstruction of each scan analysed as at completion:
    where the one chosen got no results and another was analysed in its place, reprocessing
    tries the chosen one again (and hands over again if it fails again)."""

    def skips(s: Session, series_uids: AbstractSet[str]) -> dict[str, str]:
        rows = list(s.scalars(select(Series).where(Series.series_uid.in_(series_uids))))
        return answered_for(rows, routing)

    return reprocess(db, study_uid, spool_root, t, skips)


def complete_study(s: Session, study: Study, settings: Settings, t: float) -> list[Job]:
    """Route each series with new instances; one job per series (queued, or skipped with the reason)."""
    jobs = []
    study_series = list(s.scalars(select(Series).where(Series.study_uid == study.study_uid)))
    fresh = {series.series_uid for series in study_series if series.pending}
    latest = latest_jobs(s, study.study_uid)
    unusable = {uid for uid, job in latest.items() if without_results(job)} - fresh
    # instances no job has seen: a completion, not the reconstructions routed again after
    # the chosen one got no results (`jobs.table._route_other_reconstructions_again`)
    received = any(
        x.series_uid not in latest or latest[x.series_uid].instance_count != x.instance_count
        for x in study_series
        if x.pending
    )
    routed = decisions(study_series, settings.routing, unusable)
    for series in (series for series in study_series if series.pending):
        decision = routed[series.series_uid]
        job = Job(
            study_uid=study.study_uid,
            series_uid=series.series_uid,
            state=JobState.QUEUED if decision.selected else JobState.SKIPPED,
            rule=decision.rule,
            reason=None if decision.selected else decision.reason,
            created_at=t,
            not_before=t,
            finished_at=None if decision.selected else t,
            reply_ae=series.calling_ae,
            instance_count=series.instance_count,
        )
        s.add(job)
        s.flush()
        supersede_older(s, job, t)
        series.pending = False
        series.routing = decision.reason
        jobs.append(job)
        log.info(
            "job %d (study %s): series of %d instance(s) %s (%s)",
            job.id,
            study_key(study.study_uid),
            series.instance_count,
            "queued" if decision.selected else "skipped",
            decision.reason,
            extra={"event": "job", "job_id": job.id, "state": job.state},
        )
    if received:
        metrics.STUDIES_COMPLETED.inc()
        if study.completions == 0:
            metrics.RECEIVE_TO_COMPLETE.observe(max(0.0, t - study.first_received_at))
        study.completions += 1
    study.pending = False
    study.completed_at = t
    return jobs
