"""DICOM TLS: dcmtk storescu/echoscu +tls into nodal's DIMSE port (mutual authentication),
refusals for clients without a trusted certificate and for plain TCP, and nodal's own
TLS C-STORE SCU towards a TLS peer. Certificates come from a CA generated per test module."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from dicom_node.config import ClientTls, ConfigError, ServerTls, Settings
from dicom_node.delivery.echo import echo, resolve_peer
from dicom_node.delivery.senders import DimseSender, Outgoing
from dicom_node.tls import client_context, server_context
from tests.helpers.dicom import part10
from tests.helpers.inprocess import dimse_server
from tests.helpers.peers import free_port, missing_binaries
from tests.helpers.tls_certs import have_openssl, make_pki

if not have_openssl() or missing_binaries("storescu", "echoscu"):
    pytest.skip("needs the openssl command and dcmtk (`make peers`)", allow_module_level=True)

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_node(tmp_path, pki):
    """nodal's DIMSE receiver in process, TLS only, client certificate required."""
    port = free_port()
    tls = {"enabled": True, "cert_file": str(pki.server_cert), "key_file": str(pki.server_key)}
    node = {
        "dimse_port": port,
        "bind_address": "127.0.0.1",
        "network_timeout_seconds": 5,
        "dimse_tls": {**tls, "ca_file": str(pki.ca), "require_client_cert": True},
    }
    callers = [{"ae_title": "MODALITY", "host": "127.0.0.1"}]
    with dimse_server(tmp_path, {"node": node, "allowed_callers": callers}) as server:
        yield port, server.receiver


def run(tool: str, port: int, tls: list[str], files: list[str] = ()) -> subprocess.CompletedProcess:
    cmd = [tool, "-aet", "MODALITY", "-aec", "NODAL", "-to", "5", "-ta", "5", "-td", "5", *tls]
    return subprocess.run(
        [*cmd, "127.0.0.1", str(port), *files], capture_output=True, text=True, timeout=30, check=False
    )


def test_storescu_tls_with_client_cert_stores_and_others_are_refused(tls_node, pki, tmp_path):
    port, receiver = tls_node
    f = tmp_path / "ct.dcm"
    f.write_bytes(part10(sop="1.2.3.4.77"))
    idle = socket.create_connection(("127.0.0.1", port))  # connects, never speaks
    try:
        with_cert = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]
        t = time.monotonic()
        ok = run("storescu", port, with_cert, [str(f)])
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert time.monotonic() - t < 4, "an idle TCP client must not hold up the TLS handshake of others"
    finally:
        idle.close()
    receiver.flush()
    assert (receiver.spool.root / "1.2.3" / "1.2.3.4" / "1.2.3.4.77.dcm").is_file()

    anonymous = run("echoscu", port, ["+tla", "+cf", str(pki.ca)])  # TLS, but no client certificate
    assert anonymous.returncode != 0
    rogue = run("echoscu", port, ["+tls", str(pki.rogue_key), str(pki.rogue_cert), "+cf", str(pki.ca)])
    assert rogue.returncode != 0  # a certificate from a CA nodal does not trust
    t = time.monotonic()
    plain = run("echoscu", port, [])  # plain TCP to the TLS port: refused at once, not a hang
    assert plain.returncode != 0 and time.monotonic() - t < 4
    # the node still serves TLS after all of these
    assert run("echoscu", port, with_cert).returncode == 0


def test_nodal_sends_over_tls_with_its_client_cert(tls_node, pki, tmp_path):
    port, receiver = tls_node
    f = tmp_path / "r.dcm"
    f.write_bytes(part10(sop="1.2.3.4.88"))
    item = Outgoing("1.2.3.4.88", CT, f)
    good = ClientTls(enabled=True, ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key)
    sender = DimseSender("MODALITY", "NODAL", "127.0.0.1", port, 10, tls=client_context(good, "test"))
    assert sender.send([item]) == {"1.2.3.4.88": None}
    receiver.flush()
    assert (receiver.spool.root / "1.2.3" / "1.2.3.4" / "1.2.3.4.88.dcm").is_file()

    no_cert = ClientTls(enabled=True, ca_file=pki.ca)
    err = DimseSender("MODALITY", "NODAL", "127.0.0.1", port, 5, tls=client_context(no_cert, "t")).send(
        [item]
    )
    assert "over TLS" in err["1.2.3.4.88"]
    untrusted = ClientTls(
        enabled=True, ca_file=pki.rogue_cert, cert_file=pki.client_cert, key_file=pki.client_key
    )
    err = DimseSender("MODALITY", "NODAL", "127.0.0.1", port, 5, tls=client_context(untrusted, "t")).send(
        [item]
    )
    assert "TLS handshake" in err["1.2.3.4.88"]  # the server's certificate is not trusted
    plain = DimseSender("MODALITY", "NODAL", "127.0.0.1", port, 5).send([item])
    assert plain["1.2.3.4.88"] is not None
    dest = {"name": "n", "kind": "dimse", "ae_title": "NODAL", "host": "127.0.0.1", "port": port,
            "tls": good.model_dump()}  # fmt: skip
    peer = resolve_peer("n", Settings.model_validate({"destinations": [dest]}))
    assert echo("MODALITY", peer, 5).ok  # `nodal echo n` speaks TLS to a TLS destination


def test_tls_configuration_errors_are_named(pki, tmp_path):
    with pytest.raises(ValueError, match="cert_file or key_file is not set"):
        ServerTls(enabled=True)
    with pytest.raises(ValueError, match="require_client_cert needs ca_file"):
        ServerTls(enabled=True, cert_file=pki.server_cert, key_file=pki.server_key, require_client_cert=True)
    wrong_key = ServerTls(enabled=True, cert_file=pki.server_cert, key_file=pki.client_key)
    with pytest.raises(ConfigError, match=r"node\.dimse_tls: cannot load"):
        server_context(wrong_key, "node.dimse_tls")
    with pytest.raises(ConfigError, match="does-not-exist"):
        client_context(ClientTls(enabled=True, ca_file=tmp_path / "does-not-exist.pem"), "destination x: tls")


def test_a_destinations_ca_file_wins_over_the_environments_bundle(monkeypatch, tmp_path):
    """requests lets REQUESTS_CA_BUNDLE replace a session's `verify` (psf/requests#3829)."""
    from dicom_node.tls import https_session, pin_ca

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "host-bundle.pem"))
    ours = str(tmp_path / "pacs-ca.pem")
    session = https_session(ours, ("nodal", "secret"))
    merged = session.merge_environment_settings("https://pacs.example/dicom-web", {}, None, None, None)
    assert merged["verify"] == ours and session.auth == ("nodal", "secret")
    assert session.merge_environment_settings("https://x", {}, None, False, None)["verify"] is False
    plain = https_session()  # no CA file: the environment's bundle, as requests does
    assert plain.merge_environment_settings("https://x", {}, None, None, None)["verify"] == str(
        tmp_path / "host-bundle.pem"
    )
    import requests

    assert pin_ca(requests.Session(), None).verify is True
