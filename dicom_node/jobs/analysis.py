"""The job function: instance files of one series in, result files out.

Values in, values out; no database, no network. One analyse-and-write function serves
`nodal process` (results written straight into a folder) and the workers of both queue
backends (`run_analysis`: results written to a temporary folder, fsynced, then renamed to
their final folder, so the outbox only ever holds complete result sets). The model is
loaded here too (`load_model`), once per worker process or per command. The comparison with
a prior study comes in through the `follow_up` hook (the workers pass
`jobs.followup.prior_comparison`, which does the asking and fetching), so this module stays
free of network and database.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom

from dicom_node.config import Settings
from dicom_node.jobs.outcome import FollowUp, JobOutcome, ResultFile
from dicom_node.spool.durable import fsync_dir, fsync_tree

if TYPE_CHECKING:
    from inference.findings import StudyFindings
    from inference.model_store import LoadedModel
    from inference.pipeline import Analysis, PipelineSettings
    from inference.volume import Volume

log = logging.getLogger("nodal")

# (volume, analysis, result folder) -> what became of the comparison with a prior
FollowUpHook = Callable[["Volume", "Analysis", Path], FollowUp]


class NotAnalysable(ValueError):
    """The series cannot be analysed (the reason is input-determined; retrying will not help)."""

    def __init__(self, message: str, skipped: bool):
        super().__init__(message)
        self.skipped = skipped  # True: out of scope (not a job failure); False: broken input


def _skip_errors() -> tuple[type[Exception], ...]:
    """Input that is simply not what the model analyses: the job is skipped, not failed."""
    from inference.dicom_volume import GantryTiltError, MixedOrientationError, NotCTError, TooFewSlicesError

    return (NotCTError, TooFewSlicesError, GantryTiltError, MixedOrientationError)


@dataclass(frozen=True)
class JobInput:
    job_id: int
    paths: list[Path]  # the series' instance files


@dataclass(frozen=True)
class Written:
    """What `analyse_and_write` produced."""

    analysis: Analysis
    files: list[Path]
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall time
    followup: FollowUp | None = None


def load_model(settings: Settings) -> LoadedModel:
    """The configured model (`inference.model_dir` on `inference.device`)."""
    import torch

    from inference.model_store import load_model as load

    if settings.inference.threads:
        torch.set_num_threads(settings.inference.threads)
    return load(settings.inference.model_dir, settings.inference.device)


def load_volume(source: Path | list[Path], settings: Settings) -> Volume:
    """The series as a volume, under the configured `volume` checks (raises VolumeError)."""
    from inference.dicom_volume import load_series

    vs = settings.volume
    return load_series(
        source, min_slices=vs.min_slices, max_tilt_degrees=vs.max_tilt_degrees, gap_factor=vs.gap_factor
    )


def analyse_and_write(
    volume: Volume,
    paths: list[Path],
    folder: Path,
    settings: Settings,
    model: LoadedModel,
    *,
    findings_json: bool = False,
    follow_up: FollowUpHook | None = None,
) -> Written:
    """Analyse `volume` and write SEG/SR/result images (and findings.json) into `folder`.

    `follow_up` (issue 17): called after the analysis with (volume, analysis, folder); when it
    returns a comparison, the results carry it (matched nodes keep the prior's tracking UIDs)
    and findings.json is written with it."""
    from inference.pipeline import analyse

    analysis = analyse(volume, model, pipeline_settings(settings))
    seconds = dict(analysis.seconds)
    followup = None
    if follow_up is not None:
        t = time.perf_counter()
        followup = follow_up(volume, analysis, folder)
        seconds["followup"] = time.perf_counter() - t
    t = time.perf_counter()
    comparison = followup.comparison if followup is not None else None
    if findings_json or followup is not None:
        # matched nodes carry the prior's tracking UID, as in the SEG and SR
        shown = comparison.with_prior_tracking(analysis.findings) if comparison else analysis.findings
        doc = shown.to_json()
        if followup is not None:
            doc["followup"] = followup.to_json()
            doc["comparison"] = comparison.to_json() if comparison is not None else None
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "findings.json").write_text(json.dumps(doc, indent=2) + "\n")
    written = write_findings(paths, analysis.findings, folder, settings, followup)
    if followup is not None:
        written += [folder / rel for rel in followup.prior_files]
    return Written(analysis, written, {**seconds, "encode": time.perf_counter() - t}, followup)


def write_findings(
    paths: list[Path],
    findings: StudyFindings,
    folder: Path,
    settings: Settings,
    followup: FollowUp | None = None,
) -> list[Path]:
    """SEG, SR and result images of `findings` on the series `paths`; with a comparison
    (`followup`), matched nodes keep the prior's tracking UIDs and the SR and result images
    show the prior (sr_templates)."""
    from sr_templates import write_results

    comparison = followup.comparison if followup is not None else None
    prior_volume = followup.prior_volume if followup is not None and comparison is not None else None
    return write_results(
        source_datasets(paths, {ref.sop_instance_uid for ref in findings.slices}),
        findings,
        folder,
        result_images=settings.results.result_images,
        omit_empty_frames=settings.results.omit_empty_frames,
        editable_in_ohif=settings.results.editable_in_ohif,
        comparison=comparison,
        prior_sources=prior_volume,
    )


def process(input_path: Path, out: Path, settings: Settings, model: LoadedModel | None = None) -> dict:
    """`nodal process`: load, analyse, write findings.json and the results into `out`;
    returns the findings document."""
    volume = load_volume(input_path, settings)
    written = analyse_and_write(
        volume, series_files(input_path), out, settings, model or load_model(settings), findings_json=True
    )
    doc = written.analysis.findings.to_json()
    doc["result_files"] = [p.name for p in written.files]
    log.info("stage seconds: %s", {k: round(v, 2) for k, v in written.analysis.seconds.items()})
    return doc


def run_analysis(
    job: JobInput, outbox: Path, settings: Settings, model: LoadedModel, follow_up: FollowUpHook | None = None
) -> JobOutcome:
    """Load the series, analyse it (and compare it with its prior: `follow_up`), write
    SEG/SR/result images to ``outbox/job-<id>``."""
    from inference.dicom_volume import VolumeError

    t = time.perf_counter()
    try:
        volume = load_volume(job.paths, settings)
    except VolumeError as e:
        raise NotAnalysable(f"{type(e).__name__}: {e}", skipped=isinstance(e, _skip_errors())) from None
    loaded = time.perf_counter() - t
    name = f"job-{job.job_id}"
    tmp = outbox / f".{name}.tmp"
    final = outbox / name
    shutil.rmtree(tmp, ignore_errors=True)
    written = analyse_and_write(volume, job.paths, tmp, settings, model, follow_up=follow_up)
    t = time.perf_counter()
    fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)  # an earlier attempt of the same job
    tmp.rename(final)
    fsync_dir(outbox)
    files = [_result_file(final, p.relative_to(tmp), name) for p in written.files]
    seconds = {"load": loaded, **written.seconds}
    seconds["encode"] += time.perf_counter() - t  # writing includes making it durable
    threshold = settings.inference.malignancy_threshold
    findings = written.analysis.findings.findings
    malignant = sum(1 for f in findings if f.malignancy_probability >= threshold)
    followup = written.followup.to_json() if written.followup is not None else None
    return JobOutcome(name, files, len(findings), seconds, malignant, followup)


def pipeline_settings(settings: Settings) -> PipelineSettings:
    """The inference settings of the configuration, as the pipeline takes them."""
    from inference.pipeline import PipelineSettings

    inf = settings.inference
    return PipelineSettings(
        threshold=inf.threshold,
        min_volume_mm3=inf.min_node_volume_mm3,
        boundary_refine_mm=inf.boundary_refine_mm,
        plausibility=inf.plausibility,
        roi=inf.sliding_window.roi,
        overlap=inf.sliding_window.overlap,
        batch_size=inf.sliding_window.batch_size,
    )


def series_files(input_path: Path) -> list[Path]:
    """The files of a series folder (every file below it), or the one file given."""
    return sorted(p for p in input_path.rglob("*") if p.is_file()) if input_path.is_dir() else [input_path]


def source_datasets(paths: list[Path], wanted: set[str]) -> list:
    """The analysed instances among `paths`; pixel data is read only where it is used."""
    out = []
    for p in paths:
        try:
            ds = pydicom.dcmread(p, defer_size=4096)
        except Exception:  # not DICOM: ground truth, notes, DICOMDIR companions
            continue
        if ds.get("SOPInstanceUID") in wanted:
            out.append(ds)
    return out


def _result_file(final: Path, rel: Path, folder: str) -> ResultFile:
    ds = pydicom.dcmread(final / rel, stop_before_pixels=True)
    return ResultFile(f"{folder}/{rel.as_posix()}", str(ds.SOPClassUID), str(ds.SOPInstanceUID))
