"""The query/retrieve client of a destination with a query role: one interface, two protocols."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dicom_node.config import DicomwebDestination, DimseDestination, Settings
from dicom_node.query.matches import SeriesMatch, StudyMatch
from dicom_node.query.records import QueryError, Recorder


@dataclass(frozen=True)
class StudyQuery:
    """Study-level matching keys; None: not a condition."""

    patient_id: str | None = None
    date_from: str | None = None  # DA, inclusive
    date_to: str | None = None
    study_uid: str | None = None
    accession_number: str | None = None

    def date_range(self) -> str | None:
        if self.date_from is None and self.date_to is None:
            return None
        return f"{self.date_from or ''}-{self.date_to or ''}"


class QueryClient(Protocol):
    name: str  # the destination's name

    def find_studies(self, query: StudyQuery) -> list[StudyMatch]: ...

    def find_series(self, study_uid: str) -> list[SeriesMatch]: ...

    def retrieve_series(self, study_uid: str, series_uid: str, folder: Path) -> list[Path]:
        """Fetch one series into `folder`; the files (QueryError when none came)."""
        ...


def make_client(settings: Settings, dest, recorder: Recorder) -> QueryClient:
    """The client for a destination with a query role."""
    if isinstance(dest, DimseDestination) and dest.query is not None:
        from dicom_node.query.dimse import DimseClient

        return DimseClient.for_destination(settings, dest, recorder)
    if isinstance(dest, DicomwebDestination) and dest.query is not None:
        from dicom_node.query.dicomweb import DicomwebClient

        return DicomwebClient.for_destination(dest, recorder)
    raise QueryError(f"destination {getattr(dest, 'name', dest)!r} has no query role")
