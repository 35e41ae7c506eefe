"""Finding a study's prior: earlier CT studies of the same patient within the look-back
window, most recent first, each with its comparable CT series and the SR/SEG series that
may be nodal's results (docs/follow-up.md, "Finding the prior").

"Comparable" as far as the headers say: a CT series whose Body Part Examined equals the
current one's, and whose contrast (Contrast/Bolus Agent given or not) agrees. A value the
PACS does not return is no reason to exclude a series; the retrieved prior's own headers are
checked again (`comparable_headers`) before it is used.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from pydicom.dataset import Dataset

from dicom_node.config import FollowUpSection
from dicom_node.query.client import QueryClient, StudyQuery
from dicom_node.query.matches import SeriesMatch, StudyMatch


@dataclass(frozen=True)
class CurrentStudy:
    """What the search needs from the analysed series' headers."""

    study_uid: str
    patient_id: str
    issuer_of_patient_id: str
    study_date: str
    body_part: str
    contrast: str

    @classmethod
    def from_dataset(cls, ds: Dataset) -> CurrentStudy:
        def text(k: str) -> str:
            return str(ds.get(k, "") or "").strip()

        return cls(
            text("StudyInstanceUID"),
            text("PatientID"),
            text("IssuerOfPatientID"),
            text("StudyDate"),
            text("BodyPartExamined").upper(),
            text("ContrastBolusAgent"),
        )


@dataclass(frozen=True)
class Candidate:
    """An earlier study and what it holds."""

    study: StudyMatch
    ct_series: tuple[SeriesMatch, ...]  # comparable CT series, most instances first
    sr_series: tuple[SeriesMatch, ...]  # SR series (nodal's SR is among them if it analysed the study)
    seg_series: tuple[SeriesMatch, ...]


class NoPatientId(ValueError):
    """The current study has no Patient ID: its prior cannot be searched."""


def _parse_da(value: str) -> date | None:
    try:
        return datetime.strptime(value[:8], "%Y%m%d").date()
    except ValueError:
        return None


def window(current: CurrentStudy, lookback_days: int, today: date | None = None) -> tuple[str, str]:
    """The Study Date range to search: the look-back window ending on the current Study Date."""
    end = _parse_da(current.study_date) or today or date.today()
    start = end - timedelta(days=lookback_days)
    return start.strftime("%Y%m%d"), end.strftime("%Y%m%d")


def earlier_studies(
    client: QueryClient, current: CurrentStudy, fs: FollowUpSection, today: date | None = None
) -> list[StudyMatch]:
    """The patient's other studies in the window (same issuer where both say), newest first."""
    if not current.patient_id:
        raise NoPatientId("the study has no Patient ID, so its prior cannot be searched")
    start, end = window(current, fs.lookback_days, today)
    found = client.find_studies(StudyQuery(patient_id=current.patient_id, date_from=start, date_to=end))
    out = []
    for st in found:
        if st.study_uid == current.study_uid or not st.study_uid:
            continue
        if st.patient_id and st.patient_id != current.patient_id:
            continue  # a PACS that matched loosely (wildcards, fuzzy matching)
        issuers = (st.issuer_of_patient_id, current.issuer_of_patient_id)
        if all(issuers) and issuers[0] != issuers[1]:
            continue
        if st.modalities and "CT" not in st.modalities:
            continue
        if st.study_date and not (start <= st.study_date[:8] <= end):
            continue
        out.append(st)
    return sorted(out, key=lambda s: (s.study_date, s.study_time), reverse=True)


def series_comparable(series: SeriesMatch, current: CurrentStudy, fs: FollowUpSection) -> bool:
    if series.modality != "CT":
        return False
    if fs.same_body_part and series.body_part and current.body_part and series.body_part != current.body_part:
        return False
    # the PACS says the prior had contrast and the current one has none
    return not (fs.same_contrast and series.contrast and not current.contrast)


def comparable_headers(prior: Dataset, current: CurrentStudy, fs: FollowUpSection) -> str | None:
    """None when the retrieved prior's own headers agree with the current study's, else why not."""
    body = str(prior.get("BodyPartExamined", "") or "").strip().upper()
    if fs.same_body_part and body and current.body_part and body != current.body_part:
        return f"body part {body} differs from the current {current.body_part}"
    contrast = bool(str(prior.get("ContrastBolusAgent", "") or "").strip())
    if fs.same_contrast and contrast != bool(current.contrast):
        return "contrast differs (Contrast/Bolus Agent given in one study only)"
    return None


def candidates(
    client: QueryClient,
    current: CurrentStudy,
    fs: FollowUpSection,
    min_slices: int,
    today: date | None = None,
) -> Iterator[Candidate]:
    """Up to `fs.max_candidates` earlier studies with a comparable CT series, newest first
    (each study's series are asked for only when the caller gets that far)."""
    for st in earlier_studies(client, current, fs, today)[: fs.max_candidates]:
        series = client.find_series(st.study_uid)
        ct = sorted(
            (
                s
                for s in series
                if series_comparable(s, current, fs) and (s.instances is None or s.instances >= min_slices)
            ),
            key=lambda s: -(s.instances or 0),
        )
        if ct:
            yield Candidate(
                st,
                tuple(ct),
                tuple(s for s in series if s.modality == "SR"),
                tuple(s for s in series if s.modality == "SEG"),
            )
