"""`POST /api/retrieve`: fetch a study from the PACS and analyse it, with its prior (issue 17).

Body: `{"study_instance_uid": "..."}` or `{"accession_number": "..."}`. The study's CT series
come from the query destination (`destinations[].query`) into the receiver; the study then
completes and is analysed like one that arrived, its prior found as for any study. Answers 202
with what was stored; 404 when the PACS holds no such study, 409 without a query destination
or for an accession number that names several studies, 502 when the PACS failed. Behind the
API's bearer token like every /api endpoint; audited (`user_action`, and `query`/`retrieve`
for each request to the PACS). Not the same as re-running a job from the local spool
(`POST /api/jobs/{id}/retry`).
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, model_validator

from dicom_node.config import Settings
from dicom_node.index.db import Database
from dicom_node.observe import audit, metrics
from dicom_node.query.records import QueryError, Recorder
from dicom_node.receive.receiver import Receiver
from dicom_node.receive.retrieved import Ambiguous, StudyNotFound, fetch_study

UID_PATTERN = r"^[0-9.]{1,64}$"


class RetrieveRequest(BaseModel):
    study_instance_uid: str | None = Field(None, pattern=UID_PATTERN)
    accession_number: str | None = Field(None, min_length=1, max_length=16)

    @model_validator(mode="after")
    def _one(self) -> RetrieveRequest:
        if (self.study_instance_uid is None) == (self.accession_number is None):
            raise ValueError("give exactly one of study_instance_uid and accession_number")
        return self


def retrieve_router(settings: Settings, db: Database, receiver: Receiver) -> APIRouter:
    router = APIRouter()

    @router.post("/api/retrieve", status_code=202)
    def retrieve(body: RetrieveRequest, request: Request):
        uid = body.study_instance_uid
        recorder = Recorder(db, None, audit.study_key(uid) if uid else None)
        status, answer = 202, {}
        try:
            fetched = fetch_study(settings, receiver, recorder, uid, body.accession_number)
            answer = fetched.to_json()
            uid = fetched.study_uid
            recorder.study_key = audit.study_key(uid)
            if not fetched.outcomes.get("stored"):
                answer["note"] = (
                    "nodal held every instance already; POST /api/jobs/{id}/retry runs a job again"
                )
        except StudyNotFound as e:
            status, answer = 404, {"detail": str(e)}
        except (Ambiguous, LookupError) as e:
            status, answer = 409, {"detail": str(e)}
        except QueryError as e:
            status, answer = 502, {"detail": str(e)}
        finally:
            for op in recorder.operations:
                metrics.observe_qr(op.destination, op.operation, op.outcome, op.seconds, op.instances)
        audit.user_action(
            db,
            "retrieve",
            "api",
            audit.SUCCESS if status == 202 else audit.FAILURE,
            "retrieve" if status == 202 else answer["detail"],
            request.client.host if request.client else "",
            study_uid=uid,
            extra={"status": status},
        )
        if status != 202:
            raise HTTPException(status, answer["detail"])
        return JSONResponse(answer, status_code=202)

    return router
