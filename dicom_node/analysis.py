"""The job function: instance files of one series in, result files in the outbox out.

Values in, values out; no database, no network. The same function runs in the in-process
workers of `nodal serve` and can run in any other worker (Celery) that sees the spool.
Results are written to a temporary folder, fsynced, then renamed to their final folder,
so the outbox only ever holds complete result sets.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom

from dicom_node.config import Settings
from dicom_node.jobs import JobOutcome, ResultFile
from dicom_node.spool import fsync_dir, fsync_tree


class NotAnalysable(ValueError):
    """The series cannot be analysed (the reason is input-determined; retrying will not help)."""

    def __init__(self, message: str, skipped: bool):
        super().__init__(message)
        self.skipped = skipped  # True: out of scope (not a job failure); False: broken input


# Input that is simply not what the model analyses: the job is skipped, not failed.
_SKIP_ERRORS = {"NotCTError", "TooFewSlicesError", "GantryTiltError", "MixedOrientationError"}


@dataclass(frozen=True)
class JobInput:
    job_id: int
    paths: list[Path]  # the series' instance files


def run_analysis(job: JobInput, outbox: Path, settings: Settings, model) -> JobOutcome:
    """Load the series, analyse it, write SEG/SR/result images to ``outbox/job-<id>``."""
    from inference.dicom_volume import VolumeError, load_series
    from inference.pipeline import analyse
    from sr_templates import write_results

    vs = settings.volume
    t = time.perf_counter()
    try:
        volume = load_series(
            job.paths,
            min_slices=vs.min_slices,
            max_tilt_degrees=vs.max_tilt_degrees,
            gap_factor=vs.gap_factor,
        )
    except VolumeError as e:
        name = type(e).__name__
        raise NotAnalysable(f"{name}: {e}", skipped=name in _SKIP_ERRORS) from None
    loaded = time.perf_counter() - t
    analysis = analyse(volume, model, pipeline_settings(settings))
    t = time.perf_counter()
    name = f"job-{job.job_id}"
    tmp = outbox / f".{name}.tmp"
    final = outbox / name
    shutil.rmtree(tmp, ignore_errors=True)
    written = write_results(
        source_datasets(job.paths, {ref.sop_instance_uid for ref in analysis.findings.slices}),
        analysis.findings,
        tmp,
        result_images=settings.results.result_images,
        omit_empty_frames=settings.results.omit_empty_frames,
        editable_in_ohif=settings.results.editable_in_ohif,
    )
    fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)  # an earlier attempt of the same job
    tmp.rename(final)
    fsync_dir(outbox)
    files = [_result_file(final / p.name, name) for p in written]
    seconds = {"load": loaded, **analysis.seconds, "encode": time.perf_counter() - t}
    threshold = settings.inference.malignancy_threshold
    malignant = sum(1 for f in analysis.findings.findings if f.malignancy_probability >= threshold)
    return JobOutcome(name, files, len(analysis.findings.findings), seconds, malignant)


def pipeline_settings(settings: Settings):
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


def _result_file(path: Path, folder: str) -> ResultFile:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ResultFile(f"{folder}/{path.name}", str(ds.SOPClassUID), str(ds.SOPInstanceUID))
