"""The entry points: build the result objects of one analysed series, or write them.

``build_results`` returns the datasets; ``write_results`` also saves them as ``seg.dcm``,
``sr.dcm`` and ``sc-001.dcm``... in a folder.  A study without findings has no SEG (a
segmentation needs a segment), only the SR that says so and, when asked for, one result
image.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from inference.findings import StudyFindings
from inference.followup import Comparison
from inference.volume import Volume
from sr_templates.result_images import build_result_images
from sr_templates.seg import build_seg
from sr_templates.sources import prepare_sources
from sr_templates.sr import build_sr
from sr_templates.uids import ResultUIDs

SEG_FILE = "seg.dcm"
SR_FILE = "sr.dcm"


def sc_file(index: int) -> str:
    return f"sc-{index:03d}.dcm"


@dataclass(frozen=True)
class ResultObjects:
    """The result datasets of one series (SEG absent when there are no findings)."""

    seg: Dataset | None
    sr: Dataset
    result_images: tuple[Dataset, ...] = field(default=())

    def named(self) -> list[tuple[str, Dataset]]:
        """(file name, dataset) pairs in writing order."""
        out: list[tuple[str, Dataset]] = []
        if self.seg is not None:
            out.append((SEG_FILE, self.seg))
        out.append((SR_FILE, self.sr))
        out.extend((sc_file(n), ds) for n, ds in enumerate(self.result_images, start=1))
        return out


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building.

    Building creates hundreds of thousands of small pydicom objects; with the source series
    in memory every full collection scans them all, which made encoding 30-70 % slower.
    Reference counting still frees everything; the collector runs again afterwards.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def build_results(
    source_datasets: Sequence[Dataset],
    study_findings: StudyFindings,
    *,
    result_images: bool = True,
    omit_empty_frames: bool = True,
    partial: bool = False,
    editable_in_ohif: bool = False,
    comparison: Comparison | None = None,
    prior_sources: Volume | None = None,
) -> ResultObjects:
    """Build SEG, SR and (optionally) result images for `study_findings`.

    Parameters
    ----------
    source_datasets
        The analysed CT series: its single-frame CT images, or its one Enhanced CT dataset.
        Pixel data is only needed for the result images.  They are not modified.
    study_findings
        What `inference` found in that series (`slices[k]` names the source of slice k).
    result_images
        Also render the Secondary Capture key images.
    omit_empty_frames
        Leave SEG frames without any segment pixel out (smaller); False writes a frame for
        every source slice and segment, which some viewers need.
    partial
        The analysis did not cover the whole series: the SR's Completion Flag is PARTIAL.
    editable_in_ohif
        Write the SR so that OHIF offers the axes as editable measurements
        (docs/results.md); the document stays standard.
    comparison
        A follow-up (`inference.followup.compare`): matched nodes take the prior's tracking
        UID (SEG and SR), the SR carries the time points, prior values, changes and response
        (`sr_templates.followup`), and the result objects get UIDs of their own (derived
        from the prior study too). None: the objects of a study read on its own.
    prior_sources
        The prior CT (`PriorStudy.volume`): the result images then show the prior beside
        the current slice for each node that changed.

    Raises
    ------
    sr_templates.sources.SourceMismatchError
        The datasets are not the series the findings describe.
    ValueError
        A finding is inconsistent (empty mask, probability outside [0, 1], an axis line
        outside the image, ...).
    """
    with _gc_paused():
        if comparison is not None:
            study_findings = comparison.with_prior_tracking(study_findings)
        sources = prepare_sources(source_datasets, study_findings)
        variant = "" if comparison is None else f"prior {comparison.prior_study_instance_uid}"
        result_uids = ResultUIDs(sources.sop_instance_uids, study_findings.model.version, variant)
        seg = (
            build_seg(sources, study_findings, result_uids, omit_empty_frames=omit_empty_frames)
            if study_findings.findings
            else None
        )
        sr = build_sr(
            sources,
            study_findings,
            seg,
            result_uids,
            partial=partial,
            editable_in_ohif=editable_in_ohif,
            comparison=comparison,
        )
        images = (
            tuple(
                build_result_images(
                    sources, study_findings, result_uids, comparison=comparison, prior=prior_sources
                )
            )
            if result_images
            else ()
        )
    return ResultObjects(seg=seg, sr=sr, result_images=images)


def write_results(
    source_datasets: Sequence[Dataset],
    study_findings: StudyFindings,
    out_dir: str | os.PathLike[str],
    *,
    result_images: bool = True,
    omit_empty_frames: bool = True,
    partial: bool = False,
    editable_in_ohif: bool = False,
    comparison: Comparison | None = None,
    prior_sources: Volume | None = None,
) -> list[Path]:
    """Build the result objects (see `build_results`) and save them in `out_dir`.

    Each file is written under a temporary name and renamed, so a reader never sees half a
    file.  Returns the paths written, SEG first.
    """
    results = build_results(
        source_datasets,
        study_findings,
        result_images=result_images,
        omit_empty_frames=omit_empty_frames,
        partial=partial,
        editable_in_ohif=editable_in_ohif,
        comparison=comparison,
        prior_sources=prior_sources,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, ds in results.named():
        path = out / name
        tmp = out / f".{name}.tmp"
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
        paths.append(path)
    return paths
