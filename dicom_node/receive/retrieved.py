"""A study fetched from the PACS on request (`POST /api/retrieve`, `nodal retrieve`, issue 17).

The study is found by Study Instance UID or Accession Number (C-FIND or QIDO-RS on the query
destination), its CT series are fetched (C-GET, C-MOVE or WADO-RS) into a folder of their own
and then stored through the receiver like any received instance (`via` "retrieve"): the study
completes, routing picks its series, and the job compares it with its prior as usual.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass, field

from dicom_node.config import Settings
from dicom_node.query.client import StudyQuery, make_client
from dicom_node.query.records import Recorder
from dicom_node.receive.contract import Source
from dicom_node.receive.receiver import Receiver

log = logging.getLogger("nodal.retrieve")


class StudyNotFound(LookupError):
    """The PACS holds no (CT) study for the request."""


class Ambiguous(ValueError):
    """An accession number names more than one study."""


@dataclass
class Fetched:
    study_uid: str
    series: int
    outcomes: Counter = field(default_factory=Counter)  # stored / duplicate / refused

    def to_json(self) -> dict:
        return {
            "study_instance_uid": self.study_uid,
            "series": self.series,
            "instances": {k: self.outcomes.get(k, 0) for k in ("stored", "duplicate", "refused")},
        }


def fetch_study(
    settings: Settings,
    receiver: Receiver,
    recorder: Recorder,
    study_uid: str | None = None,
    accession_number: str | None = None,
) -> Fetched:
    """Find the study on the query destination and store its CT series (QueryError: the PACS failed)."""
    dest = settings.query_peer()
    if dest is None:
        raise LookupError("no destination has a query role (destinations[].query); nothing to ask")
    client = make_client(settings, dest, recorder)
    studies = client.find_studies(StudyQuery(study_uid=study_uid, accession_number=accession_number))
    if study_uid:
        studies = [s for s in studies if s.study_uid == study_uid]
    if not studies:
        raise StudyNotFound(f"{dest.name} holds no such study")
    if len({s.study_uid for s in studies}) > 1:
        raise Ambiguous(
            f"accession number names {len(studies)} studies at {dest.name}; ask by Study Instance UID"
        )
    study = studies[0]
    series = [s for s in client.find_series(study.study_uid) if s.modality == "CT"]
    if not series:
        raise StudyNotFound(f"the study at {dest.name} has no CT series")
    fetched = Fetched(study.study_uid, len(series))
    transfer = f"retrieve-{uuid.uuid4().hex[:12]}"
    work = settings.node.data_dir / "retrieve" / transfer
    source = Source("retrieve", transfer, calling_ae=getattr(dest, "ae_title", ""), peer_host=dest.name)
    receiver.transfers.begin(transfer)
    try:
        for n, s in enumerate(series):
            for path in client.retrieve_series(study.study_uid, s.series_uid, work / str(n)):
                fetched.outcomes[receiver.store_bytes(path.read_bytes(), source).outcome.value] += 1
                path.unlink()
    finally:
        receiver.release(transfer, released=True)
        shutil.rmtree(work, ignore_errors=True)
    log.info(
        "retrieved %d CT series from %s: %s",
        len(series),
        dest.name,
        dict(fetched.outcomes),
        extra={"event": "retrieve_request", "study_key": recorder.study_key},
    )
    return fetched
