"""Query answers as plain values, whichever protocol brought them (C-FIND identifiers and
QIDO-RS results both become pydicom Datasets first)."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        return int(ds.get(keyword))
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class StudyMatch:
    study_uid: str
    study_date: str  # DA, "" when the PACS does not say
    study_time: str
    accession_number: str
    patient_id: str
    issuer_of_patient_id: str
    modalities: tuple[str, ...]  # ModalitiesInStudy (empty when the PACS does not say)

    @classmethod
    def from_dataset(cls, ds: Dataset) -> StudyMatch:
        return cls(
            study_uid=_text(ds, "StudyInstanceUID"),
            study_date=_text(ds, "StudyDate"),
            study_time=_text(ds, "StudyTime"),
            accession_number=_text(ds, "AccessionNumber"),
            patient_id=_text(ds, "PatientID"),
            issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
            modalities=tuple(m for m in _text(ds, "ModalitiesInStudy").split("\\") if m),
        )


@dataclass(frozen=True)
class SeriesMatch:
    study_uid: str
    series_uid: str
    modality: str
    body_part: str  # BodyPartExamined, "" when not said
    contrast: str  # ContrastBolusAgent, "" when not said (or not given)
    description: str
    instances: int | None

    @classmethod
    def from_dataset(cls, ds: Dataset, study_uid: str) -> SeriesMatch:
        return cls(
            study_uid=_text(ds, "StudyInstanceUID") or study_uid,
            series_uid=_text(ds, "SeriesInstanceUID"),
            modality=_text(ds, "Modality"),
            body_part=_text(ds, "BodyPartExamined").upper(),
            contrast=_text(ds, "ContrastBolusAgent"),
            description=_text(ds, "SeriesDescription"),
            instances=_int(ds, "NumberOfSeriesRelatedInstances"),
        )


STUDY_RETURN_KEYS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "PatientID",
    "IssuerOfPatientID",
    "ModalitiesInStudy",
)
SERIES_RETURN_KEYS = (
    "SeriesInstanceUID",
    "Modality",
    "BodyPartExamined",
    "ContrastBolusAgent",
    "SeriesDescription",
    "NumberOfSeriesRelatedInstances",
)
