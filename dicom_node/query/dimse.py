"""DIMSE query/retrieve SCU (pynetdicom): C-FIND, C-GET and C-MOVE, study root.

C-GET brings the instances back on the same association (nodal takes the storage SCP role
for the SOP classes it asks for); C-MOVE has the PACS send them to `move_destination`
(nodal's own receiver by default, where `holding.Holding` keeps them out of the analysis
path). TLS as for sending (`destination.tls`).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import uid as pdu
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicom_node.config import DimseDestination, Settings
from dicom_node.query.client import StudyQuery
from dicom_node.query.holding import Holding
from dicom_node.query.matches import SERIES_RETURN_KEYS, STUDY_RETURN_KEYS, SeriesMatch, StudyMatch
from dicom_node.query.records import FIND, GET, MOVE, QueryError, Recorder
from dicom_node.tls import client_context

PENDING = (0xFF00, 0xFF01)
# What a retrieval may bring: the CT of a prior and nodal's own results.
RETRIEVED_SOP_CLASSES = (
    pdu.CTImageStorage,
    pdu.EnhancedCTImageStorage,
    pdu.LegacyConvertedEnhancedCTImageStorage,
    pdu.SegmentationStorage,
    pdu.Comprehensive3DSRStorage,
    pdu.ComprehensiveSRStorage,
    pdu.EnhancedSRStorage,
    pdu.SecondaryCaptureImageStorage,
)
RETRIEVED_SYNTAXES = [pdu.ExplicitVRLittleEndian, pdu.ImplicitVRLittleEndian]


@dataclass
class DimseClient:
    name: str
    calling_ae: str
    ae_title: str
    host: str
    port: int
    recorder: Recorder
    retrieve: str = "get"  # get | move
    move_destination: str = ""
    holding: Holding | None = None
    timeout: float = 300.0
    max_pdu: int = 131072
    tls: ssl.SSLContext | None = field(default=None, repr=False)

    @classmethod
    def for_destination(cls, settings: Settings, dest: DimseDestination, recorder: Recorder) -> DimseClient:
        q = dest.query
        assert q is not None
        return cls(
            dest.name,
            settings.node.ae_title,
            dest.ae_title,
            dest.host,
            dest.port,
            recorder,
            q.retrieve,
            q.move_destination or settings.node.ae_title,
            Holding(settings.node.data_dir),
            q.timeout_seconds,
            settings.node.max_pdu_bytes,
            client_context(dest.tls, f"destination {dest.name}: tls"),
        )

    @property
    def where(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"

    @contextmanager
    def _association(self, contexts, roles=(), handlers=()) -> Iterator:
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.network_timeout = 30.0
        ae.dimse_timeout = self.timeout
        ae.maximum_pdu_size = self.max_pdu
        for sop_class, syntaxes in contexts:
            ae.add_requested_context(sop_class, syntaxes)
        tls_args = (self.tls, self.host if self.tls.check_hostname else None) if self.tls else None
        try:
            assoc = ae.associate(
                self.host,
                self.port,
                ae_title=self.ae_title,
                ext_neg=list(roles) or None,
                evt_handlers=list(handlers) or None,
                tls_args=tls_args,  # type: ignore[arg-type]
            )
        except OSError as e:
            raise QueryError(f"cannot connect to {self.where}: {e}") from None
        if not assoc.is_established:
            if assoc.is_rejected:
                raise QueryError(f"association rejected by {self.where} (is {self.calling_ae} known there?)")
            raise QueryError(f"no association with {self.where} (peer down, port closed, TLS or aborted)")
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def _find(self, identifier: Dataset) -> list[Dataset]:
        model = StudyRootQueryRetrieveInformationModelFind
        out: list[Dataset] = []
        with self._association([(model, None)]) as assoc:
            for status, answer in assoc.send_c_find(identifier, model):
                code = getattr(status, "Status", None)
                if code is None:
                    raise QueryError(
                        f"no C-FIND response from {self.where} (timeout, or the peer aborted: "
                        f"may {self.calling_ae} query there?)"
                    )
                if code in PENDING:
                    if answer is not None:
                        out.append(answer)
                elif code == 0x0000:
                    break
                else:
                    raise QueryError(f"{self.where} answered C-FIND status 0x{code:04X}")
        return out

    def find_studies(self, query: StudyQuery) -> list[StudyMatch]:
        with self.recorder.operation(self.name, FIND, "STUDY") as op:
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            for key in STUDY_RETURN_KEYS:
                setattr(ds, key, "")
            ds.PatientID = query.patient_id or ""
            ds.StudyInstanceUID = query.study_uid or ""
            ds.AccessionNumber = query.accession_number or ""
            ds.StudyDate = query.date_range() or ""
            found = [StudyMatch.from_dataset(a) for a in self._find(ds)]
            op.matches = len(found)
            return found

    def find_series(self, study_uid: str) -> list[SeriesMatch]:
        with self.recorder.operation(self.name, FIND, "SERIES") as op:
            ds = Dataset()
            ds.QueryRetrieveLevel = "SERIES"
            ds.StudyInstanceUID = study_uid
            for key in SERIES_RETURN_KEYS:
                setattr(ds, key, "")
            found = [SeriesMatch.from_dataset(a, study_uid) for a in self._find(ds)]
            op.matches = len(found)
            return found

    def retrieve_series(self, study_uid: str, series_uid: str, folder: Path) -> list[Path]:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "SERIES"
        identifier.StudyInstanceUID = study_uid
        identifier.SeriesInstanceUID = series_uid
        folder.mkdir(parents=True, exist_ok=True)
        operation = MOVE if self.retrieve == "move" else GET
        with self.recorder.operation(self.name, operation, "SERIES") as op:
            if operation == GET:
                self._get(identifier, folder)
            else:
                self._move(identifier, series_uid, folder)
            files = sorted(folder.glob("*.dcm"))
            op.instances = len(files)
            if not files:
                raise QueryError(f"{self.where} sent no instance of the series")
            return files

    def _get(self, identifier: Dataset, folder: Path) -> None:
        model = StudyRootQueryRetrieveInformationModelGet
        contexts = [(model, None)] + [(c, RETRIEVED_SYNTAXES) for c in RETRIEVED_SOP_CLASSES]
        roles = [build_role(c, scp_role=True) for c in RETRIEVED_SOP_CLASSES]

        def on_store(event) -> int:
            req = event.request
            try:
                Holding.store(
                    folder,
                    str(req.AffectedSOPClassUID),
                    str(req.AffectedSOPInstanceUID),
                    str(event.context.transfer_syntax),
                    req.DataSet.getvalue(),
                    self.ae_title,
                )
            except (OSError, ValueError):
                return 0xA700  # out of resources / cannot store
            return 0x0000

        with self._association(contexts, roles, [(evt.EVT_C_STORE, on_store)]) as assoc:
            self._final(assoc.send_c_get(identifier, model), "C-GET")

    def _move(self, identifier: Dataset, series_uid: str, folder: Path) -> None:
        model = StudyRootQueryRetrieveInformationModelMove
        assert self.holding is not None
        with self.holding.expect(series_uid, folder), self._association([(model, None)]) as assoc:
            self._final(
                assoc.send_c_move(identifier, self.move_destination, model),
                f"C-MOVE to {self.move_destination}",
            )

    def _final(self, responses, what: str) -> None:
        code = None
        for status, _ in responses:
            code = getattr(status, "Status", None)
            if code is None:
                raise QueryError(
                    f"no {what} response from {self.where} (timeout, or the peer aborted: "
                    f"may {self.calling_ae} retrieve there?)"
                )
            if code in PENDING:
                continue
            if code in (0x0000, 0xB000):  # B000: some sub-operations failed; the caller checks what came
                return
            if code == 0xA801:
                raise QueryError(f"{self.where} does not know the move destination {self.move_destination}")
            raise QueryError(f"{self.where} answered {what} status 0x{code:04X}")
        if code is None:
            raise QueryError(f"no {what} response from {self.where}")
