"""`POST /api/retrieve` sits behind the API's bearer token like every /api endpoint (issue 17)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from dicom_node.api.app import create_app
from dicom_node.config import Settings
from dicom_node.index.db import Database
from dicom_node.observe import audit
from dicom_node.receive.receiver import Receiver
from dicom_node.spool.store import Spool


def test_retrieve_needs_the_token(tmp_path):
    s = Settings.model_validate({"node": {"data_dir": str(tmp_path), "http_auth": {"token": "s3cret"}}})
    db = Database(s.index_url())
    spool = Spool(tmp_path / "spool")
    receiver = Receiver(spool, db)
    try:
        client = TestClient(create_app(s, db, receiver, lambda: True))
        body = {"study_instance_uid": "1.2.3"}
        assert client.post("/api/retrieve", json=body).status_code == 401
        wrong = client.post("/api/retrieve", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = client.post("/api/retrieve", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 409  # through the gate; no destination has a query role
        [refused] = [e for e in audit.query(db, "user_action") if e["detail"].get("action") == "retrieve"]
        assert refused["outcome"] == "failure" and refused["detail"]["status"] == 409
    finally:
        receiver.close()
        spool.close()
        db.close()
