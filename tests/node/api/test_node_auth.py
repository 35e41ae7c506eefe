"""HTTP security: bearer token on STOW-RS and the API (probes open), HTTPS, and secrets
(token, destination password, TLS key) never in `nodal config` output or in the log."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import requests
from fastapi.testclient import TestClient
from sqlalchemy import select

from dicom_node.api.app import create_app
from dicom_node.api.auth import OPEN_PATHS, token_matches
from dicom_node.config import ConfigError, Settings
from dicom_node.delivery.senders import Outgoing, make_sender
from dicom_node.index.db import AuditEvent, Database
from dicom_node.observe import metrics
from dicom_node.receive.receiver import Receiver
from dicom_node.serve import check_destinations
from dicom_node.spool.store import Spool
from tests.helpers.dicom import part10
from tests.helpers.peers import Nodal, free_port, missing_binaries, wait_until
from tests.helpers.stow import HEADERS, body
from tests.helpers.tls_certs import have_openssl, make_pki

TOKEN = "tok-5f1d8c0e9a7b4e21"


@pytest.fixture
def app_with_token(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'i.sqlite3'}")
    spool = Spool(tmp_path / "spool")
    receiver = Receiver(spool, db)
    (tmp_path / "token").write_text(TOKEN + "\n")
    settings = Settings.model_validate({"node": {"http_auth": {"token_file": str(tmp_path / "token")}}})
    with TestClient(create_app(settings, db, receiver, ready=lambda: True)) as c:
        c.db = db
        yield c
    receiver.close()
    spool.close()
    db.close()


def test_token_required_except_on_the_probes(app_with_token):
    c = app_with_token
    for path in ("/api/jobs", "/api/studies"):
        r = c.get(path)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith('Bearer realm="nodal"')
        assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get(path, headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
        assert c.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    stow = body([part10()])
    assert c.post("/dicom-web/studies", content=stow, headers=HEADERS).status_code == 401
    auth = {**HEADERS, "Authorization": f"Bearer {TOKEN}"}
    assert c.post("/dicom-web/studies", content=stow, headers=auth).status_code == 200
    assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
    assert c.get("/metrics").status_code != 401  # served by the metrics module where present
    assert {"/healthz", "/readyz", "/metrics"} == OPEN_PATHS


def test_refused_requests_are_counted_and_audited_without_uids(app_with_token):
    c = app_with_token
    refused = {r: metrics.HTTP_REFUSED.labels(r)._value.get() for r in ("missing", "invalid")}
    by_reason = {r: metrics.HTTP_REFUSED_BY_REASON.labels(f"token_{r}")._value.get() for r in refused}
    study = "1.2.826.0.1.3680043.8.498.1"
    assert c.post(f"/dicom-web/studies/{study}", content=b"", headers=HEADERS).status_code == 401
    assert c.get("/api/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/api/jobs", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert metrics.HTTP_REFUSED.labels("missing")._value.get() == refused["missing"] + 1
    assert metrics.HTTP_REFUSED.labels("invalid")._value.get() == refused["invalid"] + 1
    for r in refused:  # and in the count of every refused request
        assert metrics.HTTP_REFUSED_BY_REASON.labels(f"token_{r}")._value.get() == by_reason[r] + 1
    with c.db.session() as s:
        rows = s.scalars(select(AuditEvent).where(AuditEvent.event == "authentication")).all()
    assert [(r.outcome, json.loads(r.detail)["area"]) for r in rows] == [
        ("failure", "/dicom-web"),
        ("failure", "/api"),
    ]
    assert all(study not in r.detail for r in rows)


def test_token_comparison():
    assert token_matches(f"Bearer {TOKEN}", TOKEN) and token_matches(f"bearer  {TOKEN} ", TOKEN)
    assert not token_matches(TOKEN, TOKEN) and not token_matches(f"Bearer {TOKEN}x", TOKEN)
    assert not token_matches("Bearer ", TOKEN)


def test_unreadable_secret_files_are_named(tmp_path):
    settings = Settings.model_validate({"node": {"http_auth": {"token_file": str(tmp_path / "nope")}}})
    with pytest.raises(ConfigError, match=r"node.http_auth: cannot read .*nope"):
        create_app(settings, None, None, ready=lambda: True)  # type: ignore[arg-type]
    (tmp_path / "empty").write_text("\n")
    dest = {
        "name": "w",
        "kind": "dicomweb",
        "url": "http://x/dicom-web",
        "password_file": str(tmp_path / "empty"),
    }
    with pytest.raises(ConfigError, match=r"destination w: password: .* is empty"):
        check_destinations(Settings.model_validate({"destinations": [dest]}))  # at start-up
    tls = {"enabled": True, "ca_file": str(tmp_path / "no-ca.pem")}
    dimse = {"name": "d", "kind": "dimse", "ae_title": "P", "host": "h", "port": 104, "tls": tls}
    with pytest.raises(ConfigError, match=r"destination d: tls: cannot load .*no-ca.pem"):
        check_destinations(Settings.model_validate({"destinations": [dimse]}))


def test_sender_errors_and_reprs_carry_no_password(tmp_path):
    f = tmp_path / "x.dcm"
    f.write_bytes(part10())
    dest = {"name": "w", "kind": "dicomweb", "url": f"http://127.0.0.1:{free_port()}/dicom-web",
            "username": "nodal", "password": "pw-31337-abc"}  # fmt: skip
    settings = Settings.model_validate({"destinations": [dest]})
    sender = make_sender(settings.destinations[0], settings, "")
    errors = sender.send([Outgoing("1.2.3.4.5", "1.2.840.10008.5.1.4.1.1.2", f)])
    assert "failed" in errors["1.2.3.4.5"] and "pw-31337-abc" not in errors["1.2.3.4.5"]
    assert "pw-31337-abc" not in repr(sender) + repr(settings) + str(settings.model_dump())
    with pytest.raises(ValueError, match="credentials"):
        Settings.model_validate({"destinations": [{**dest, "url": "http://u:pw@pacs/dicom-web"}]})


def test_nodal_config_never_prints_secrets(tmp_path):
    cfg = tmp_path / "node.yaml"
    cfg.write_text(
        "destinations: [{name: w, kind: dicomweb, url: 'http://x/dicom-web', username: u, "
        "password: pw-inline-12345}]\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODAL_")}
    env["NODAL_NODE__HTTP_AUTH__TOKEN"] = TOKEN
    out = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "--config", str(cfg), "config"],
        capture_output=True, text=True, env=env, check=True,
    ).stdout  # fmt: skip
    assert TOKEN not in out and "pw-inline-12345" not in out
    assert out.count("'**********'") == 2  # the token and the password, masked


@pytest.mark.peers
@pytest.mark.skipif(not have_openssl() or bool(missing_binaries("storescu")), reason="needs openssl, dcmtk")
def test_https_dimse_tls_and_no_secret_in_the_log(tmp_path, monkeypatch):
    """A node with every secret configured, at DEBUG: HTTPS + token works, DICOM TLS works,
    and none of the token, the destination password or the private keys is in the log."""
    pki = make_pki(tmp_path / "pki")
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    (secrets / "token").write_text(TOKEN)
    password = "pw-7c2e91aa0d"
    (secrets / "pacs-password").write_text(password)
    dimse_port = free_port()
    tls = {"enabled": True, "cert_file": str(pki.server_cert), "key_file": str(pki.server_key)}
    cfg = {
        "node": {
            "ae_title": "NODAL",
            "dimse_port": dimse_port,
            "http_port": free_port(),
            "data_dir": str(tmp_path / "var"),
            "bind_address": "127.0.0.1",
            "dimse_tls": {**tls, "ca_file": str(pki.ca), "require_client_cert": True},
            "http_tls": tls,
            "http_auth": {"token_file": str(secrets / "token")},
        },
        "completion": {"quiet_seconds": 1.0, "after_release_seconds": 0.5, "check_interval_seconds": 0.5},
        "jobs": {"workers": 0},
        "routing": {"rules": [{"name": "all", "modalities": ["CT"], "min_slices": 1}]},
        "destinations": [
            {
                "name": "web",
                "kind": "dicomweb",
                "url": f"https://127.0.0.1:{free_port()}/dicom-web",
                "username": "nodal",
                "password_file": str(secrets / "pacs-password"),
                "ca_file": str(pki.ca),
            },
        ],
        "delivery": {"retry_initial_seconds": 1.0, "retry_max_seconds": 2.0, "check_interval_seconds": 0.5},
        "spool": {"min_free_mb": 0},
        "retention": {"min_free_gb": 0.0},
        "logging": {"level": "DEBUG"},
    }
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki.ca))  # so the helper's probes trust the test CA
    nodal = Nodal(tmp_path, cfg)
    nodal.http = nodal.http.replace("http://", "https://")
    nodal.start(ready_path="/healthz")
    try:
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"{nodal.http}/healthz", verify=str(pki.rogue_cert), timeout=5)
        assert requests.get(f"{nodal.http}/api/jobs", timeout=5).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        r = requests.post(
            f"{nodal.http}/dicom-web/studies",
            data=body([part10(sop="1.2.3.4.1"), part10(sop="1.2.3.4.2")]),
            headers={**HEADERS, **auth},
            timeout=10,
        )
        assert r.status_code == 200, r.text
        f = tmp_path / "x.dcm"
        f.write_bytes(part10(sop="1.2.3.4.3"))
        sent = subprocess.run(
            ["storescu", "-aet", "CT1", "-aec", "NODAL", "+tls", str(pki.client_key), str(pki.client_cert),
             "+cf", str(pki.ca), "127.0.0.1", str(dimse_port), str(f)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stdout + sent.stderr
        study = requests.get(f"{nodal.http}/api/studies/1.2.3", headers=auth, timeout=10).json()
        assert study["instances"] == 3
        wait_until(lambda: "TLS client certificate 'client'" in nodal.log(), 10, "the TLS association")
    finally:
        assert nodal.stop() == 0
    log = nodal.log()
    assert "HTTPS port" in log and "(TLS)" in log
    assert TOKEN not in log and password not in log
    for key in (pki.server_key, pki.client_key):
        body_lines = key.read_text().splitlines()[1:-1]
        assert not any(line in log for line in body_lines)
    assert "PRIVATE KEY" not in log
