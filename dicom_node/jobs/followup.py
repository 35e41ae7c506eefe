"""The follow-up step of a job: find the study's prior, fetch it, compare (issue 17).

Runs in the worker after the current series was analysed and before its results are
written (`analysis.run_analysis` calls it through its `follow_up` hook):

1. search the query destination for earlier CT studies of the patient (`query.prior`);
2. for the most recent comparable one, fetch its SR series and look for nodal's own SR
   (`sr_templates.is_nodal_sr`): if found, its nodes and tracking UIDs are the prior's;
3. fetch the prior CT series (for registration; without nodal's SR also to analyse it with
   the loaded model, its results written beside the current ones when
   `followup.send_prior_results`);
4. `inference.followup.compare`.

Nothing here ever fails the job: every problem becomes a `FollowUp` with an outcome and a
reason, recorded on the job, and the results go out as they would without a prior.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom

from dicom_node.config import Settings
from dicom_node.index.db import Database
from dicom_node.jobs.analysis import load_volume, pipeline_settings, write_findings
from dicom_node.jobs.outcome import FollowUp
from dicom_node.observe.audit import study_key
from dicom_node.query.client import QueryClient, make_client
from dicom_node.query.prior import Candidate, CurrentStudy, NoPatientId, candidates, comparable_headers
from dicom_node.query.records import QueryError, Recorder

if TYPE_CHECKING:
    from inference.findings import StudyFindings
    from inference.model_store import LoadedModel
    from inference.pipeline import Analysis
    from inference.volume import Volume

log = logging.getLogger("nodal.followup")

PRIOR_FOLDER = "prior"  # beside the current results: the prior's own SEG/SR, when nodal analysed it now


class NotComparable(ValueError):
    """The fetched prior's headers say it is not comparable (try an older one)."""


class PriorUnusable(ValueError):
    """The prior was fetched but cannot be used (no volume, no readable SR)."""


def wanted(settings: Settings) -> bool:
    return settings.followup.enabled and settings.query_peer() is not None


def prior_comparison(
    settings: Settings,
    db: Database | None,
    job_id: int,
    model: LoadedModel,
    paths: list[Path],
    volume: Volume,
    analysis: Analysis,
    folder: Path,
) -> FollowUp:
    """The comparison of the analysed series with its prior, or why there is none."""
    dest = settings.query_peer()
    assert dest is not None
    header = pydicom.dcmread(paths[0], stop_before_pixels=True)
    current = CurrentStudy.from_dataset(header)
    recorder = Recorder(db, job_id, study_key(current.study_uid))
    work = settings.node.data_dir / "retrieve" / f"job-{job_id}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        result = _follow_up(
            settings, make_client(settings, dest, recorder), current, model, volume, analysis, folder, work
        )
    except Exception as e:  # a bug or an unexpected peer answer must not cost the current results
        log.exception("job %d: follow-up failed unexpectedly", job_id)
        result = FollowUp("prior_unusable", f"unexpected error: {type(e).__name__}: {e}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.operations = [op.to_json() for op in recorder.operations]
    log.info(
        "job %d: follow-up %s%s",
        job_id,
        result.outcome,
        f" ({result.reason})" if result.reason else "",
        extra={"event": "followup", "job_id": job_id, "outcome": result.outcome},
    )
    return result


def _follow_up(
    settings: Settings,
    client: QueryClient,
    current: CurrentStudy,
    model: LoadedModel,
    volume: Volume,
    analysis: Analysis,
    folder: Path,
    work: Path,
) -> FollowUp:
    from inference.followup import FollowUpError, FollowUpSettings, compare
    from inference.pipeline import look_judge

    fs = settings.followup
    skipped: list[str] = []
    try:
        found = candidates(client, current, fs, settings.volume.min_slices)
        for n, cand in enumerate(found):
            try:
                prior, prior_files = _prior_study(
                    settings, client, cand, current, model, folder, work / str(n)
                )
            except NotComparable as e:
                skipped.append(f"prior {n + 1}: {e}")  # no dates: the reason is logged
                continue
            except QueryError as e:
                return FollowUp(
                    "retrieve_failed",
                    f"prior {n + 1} (newest comparable first): {e}",
                    None,
                    cand.study.study_uid,
                )
            except PriorUnusable as e:
                return FollowUp("prior_unusable", str(e), None, cand.study.study_uid)
            try:
                comparison = compare(
                    prior,
                    volume,
                    analysis.findings,
                    settings=FollowUpSettings(registration=fs.registration),
                    judge=look_judge(model),
                )
            except FollowUpError as e:
                return FollowUp(
                    "compare_failed", str(e), None, prior.study_instance_uid, prior.source, prior_files
                )
            return FollowUp(
                "compared",
                "",
                comparison,
                prior.study_instance_uid,
                prior.source,
                prior_files,
                prior_volume=prior.volume,
            )
    except NoPatientId as e:
        return FollowUp("no_prior", str(e))
    except QueryError as e:
        return FollowUp("query_failed", str(e))
    why = f"no comparable CT study in the last {fs.lookback_days} days"
    return FollowUp("no_prior", why + (f" (not comparable: {'; '.join(skipped)})" if skipped else ""))


def _prior_study(
    settings: Settings,
    client: QueryClient,
    cand: Candidate,
    current: CurrentStudy,
    model: LoadedModel,
    folder: Path,
    work: Path,
):
    """The prior as `inference.followup.PriorStudy`, and the prior result files written."""
    from inference.dicom_volume import VolumeError
    from inference.followup import FROM_ANALYSIS, FROM_SR, FollowUpError, PriorStudy

    study = cand.study
    sr, ct_uid = _nodal_sr(client, cand, work / "sr")
    ct_series = next((s for s in cand.ct_series if s.series_uid == ct_uid), None) or cand.ct_series[0]
    paths = client.retrieve_series(study.study_uid, ct_series.series_uid, work / "ct")
    header = pydicom.dcmread(paths[0], stop_before_pixels=True)
    why = comparable_headers(header, current, settings.followup)
    if why is not None:
        raise NotComparable(why)
    try:
        volume = load_volume(paths, settings)
    except VolumeError as e:
        raise PriorUnusable(f"the prior CT series cannot be loaded: {e}") from None

    def prior_study(nodes, source: str) -> PriorStudy:
        return PriorStudy(
            study_instance_uid=study.study_uid,
            series_instance_uid=ct_series.series_uid,
            study_date=study.study_date or str(header.get("StudyDate", "") or ""),
            nodes=nodes,
            volume=volume,
            source=source,
            frame_of_reference_uid=str(header.get("FrameOfReferenceUID", "") or ""),
        )

    if sr is not None:
        from sr_templates import read_prior_nodes

        images = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
        try:
            nodes = read_prior_nodes(sr.sr, sr.seg, images=images, volume=volume)
        except FollowUpError as e:
            raise PriorUnusable(f"nodal's SR of the prior cannot be read: {e}") from None
        return prior_study(nodes, FROM_SR), []
    findings = _analyse_prior(volume, settings, model)
    from inference.followup import prior_nodes

    send = settings.followup.send_prior_results
    written = _write_prior_results(paths, findings, folder / PRIOR_FOLDER, settings) if send else []
    return prior_study(prior_nodes(findings), FROM_ANALYSIS), written


def _nodal_sr(client: QueryClient, cand: Candidate, work: Path) -> tuple[NodalResults | None, str | None]:
    """nodal's newest SR in the prior study with its SEG (if the PACS holds it), and the CT
    series the SR reports on; (None, None) when nodal's SR is not there."""
    from sr_templates import is_nodal_sr

    best: pydicom.Dataset | None = None
    for n, series in enumerate(cand.sr_series):
        for path in client.retrieve_series(cand.study.study_uid, series.series_uid, work / f"sr-{n}"):
            ds = pydicom.dcmread(path)
            if is_nodal_sr(ds) and (best is None or _when(ds) > _when(best)):
                best = ds
    if best is None:
        return None, None
    evidence = _evidence_series(best)
    seg = None
    for n, series in enumerate(s for s in cand.seg_series if s.series_uid in evidence):
        paths = client.retrieve_series(cand.study.study_uid, series.series_uid, work / f"seg-{n}")
        seg = pydicom.dcmread(paths[0])
    ct = next((uid for uid in evidence if uid in {s.series_uid for s in cand.ct_series}), None)
    return NodalResults(best, seg), ct


@dataclass(frozen=True)
class NodalResults:
    """nodal's own results for the prior, found in the PACS."""

    sr: pydicom.Dataset
    seg: pydicom.Dataset | None


def _when(ds: pydicom.Dataset) -> str:
    return f"{ds.get('ContentDate', '')}{ds.get('ContentTime', '')}"


def _evidence_series(sr: pydicom.Dataset) -> list[str]:
    """The series the SR names as its evidence (the CT it reports on, nodal's SEG)."""
    out = []
    for seq in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in sr.get(seq, []):
            out += [str(series.SeriesInstanceUID) for series in study.get("ReferencedSeriesSequence", [])]
    return out


def _analyse_prior(volume: Volume, settings: Settings, model: LoadedModel) -> StudyFindings:
    from inference.pipeline import analyse

    t = time.perf_counter()
    findings = analyse(volume, model, pipeline_settings(settings)).findings
    log.info("prior analysed in %.1f s: %d node(s)", time.perf_counter() - t, len(findings.findings))
    return findings


def _write_prior_results(
    paths: list[Path], findings: StudyFindings, out: Path, settings: Settings
) -> list[str]:
    return [f"{PRIOR_FOLDER}/{p.name}" for p in write_findings(paths, findings, out, settings)]
