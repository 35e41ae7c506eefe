"""DICOMweb query/retrieve client (dicomweb-client): QIDO-RS and WADO-RS.

The destination's url (or `query.url`), its credentials and its CA file, as for STOW-RS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from dicom_node.config import DicomwebDestination
from dicom_node.query.client import StudyQuery
from dicom_node.query.holding import safe_uid
from dicom_node.query.matches import SERIES_RETURN_KEYS, STUDY_RETURN_KEYS, SeriesMatch, StudyMatch
from dicom_node.query.records import QIDO, WADO, QueryError, Recorder
from dicom_node.tls import https_session


def web_client(url: str, username: str | None, password: str | None, ca_file: str | None, timeout: float):
    """A dicomweb-client for `url` (basic auth, CA file for https://), without its own retries:
    the callers retry on their own terms (the outbox, the next job). STOW-RS uses it too."""
    from dicomweb_client.api import DICOMwebClient

    session = https_session(ca_file, (username, password or "") if username else None)
    client = DICOMwebClient(url=url, session=session, timeout=timeout)
    client.set_http_retry_params(retry=False)
    return client


@dataclass
class DicomwebClient:
    name: str
    url: str
    recorder: Recorder
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    timeout: float = 300.0

    @classmethod
    def for_destination(cls, dest: DicomwebDestination, recorder: Recorder) -> DicomwebClient:
        q = dest.query
        assert q is not None
        return cls(
            dest.name,
            q.url or dest.url,
            recorder,
            dest.username,
            dest.secret(),
            str(dest.ca_file) if dest.ca_file else None,
            q.timeout_seconds,
        )

    def _client(self):
        return web_client(self.url, self.username, self.password, self.ca_file, self.timeout)

    def _call(self, what: str, fn):
        import requests

        try:
            return fn(self._client())
        except requests.HTTPError as e:
            code = e.response.status_code if e.response is not None else "?"
            raise QueryError(f"{what} at {self.url} answered HTTP {code}") from None
        except requests.RequestException as e:
            raise QueryError(f"{what} at {self.url} failed: {type(e).__name__}") from None

    def find_studies(self, query: StudyQuery) -> list[StudyMatch]:
        filters: dict[str, str] = {}
        if query.patient_id:
            filters["PatientID"] = query.patient_id
        if query.study_uid:
            filters["StudyInstanceUID"] = query.study_uid
        if query.accession_number:
            filters["AccessionNumber"] = query.accession_number
        if query.date_range():
            filters["StudyDate"] = query.date_range()  # type: ignore[assignment]
        with self.recorder.operation(self.name, QIDO, "STUDY") as op:
            answers = self._call(
                "QIDO-RS",
                lambda c: c.search_for_studies(
                    search_filters=filters, fields=list(STUDY_RETURN_KEYS), get_remaining=True
                ),
            )
            found = [StudyMatch.from_dataset(Dataset.from_json(a)) for a in answers]
            op.matches = len(found)
            return found

    def find_series(self, study_uid: str) -> list[SeriesMatch]:
        with self.recorder.operation(self.name, QIDO, "SERIES") as op:
            answers = self._call(
                "QIDO-RS",
                lambda c: c.search_for_series(
                    study_instance_uid=study_uid, fields=list(SERIES_RETURN_KEYS), get_remaining=True
                ),
            )
            found = [SeriesMatch.from_dataset(Dataset.from_json(a), study_uid) for a in answers]
            op.matches = len(found)
            return found

    def retrieve_series(self, study_uid: str, series_uid: str, folder: Path) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        with self.recorder.operation(self.name, WADO, "SERIES") as op:
            datasets = self._call(
                "WADO-RS",
                lambda c: c.retrieve_series(study_instance_uid=study_uid, series_instance_uid=series_uid),
            )
            files = []
            for ds in datasets:
                sop = safe_uid(str(ds.SOPInstanceUID), "SOP Instance UID")
                path = folder / f"{sop}.dcm"
                ds.save_as(path, enforce_file_format=True)
                files.append(path)
            op.instances = len(files)
            if not files:
                raise QueryError(f"WADO-RS at {self.url} returned no instance of the series")
            return files
