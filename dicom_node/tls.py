"""TLS contexts for the receivers (DIMSE, HTTPS) and the outgoing DICOM connections.

Server side: TLS 1.2 or newer with the system's default ciphers (BCP 195), the node's
certificate and key, and with `require_client_cert` the CA that client certificates must
chain to (mutual authentication, PS3.15 B.1 / IHE ATNA node authentication).

The DIMSE server's context defers the handshake from `accept()` to the association's own
thread (`do_handshake_on_connect=False`): pynetdicom wraps accepted sockets in its single
accept loop, where a client that connects and never speaks would otherwise block every
other caller. The handshake then runs on the first read, under the network timeout.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from dicom_node.config import ClientTls, ConfigError, ServerTls


class _DeferredHandshakeContext(ssl.SSLContext):
    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True, **kwargs):
        return super().wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False, **kwargs)


def _load(action, what: str, *paths: Path | None) -> None:
    try:
        action()
    except (OSError, ssl.SSLError) as e:
        files = ", ".join(str(p) for p in paths if p is not None)
        raise ConfigError(
            f"{what}: cannot load {files} ({getattr(e, 'strerror', None) or e}); "
            "check the paths, that they hold PEM data and that the key matches the certificate"
        ) from None


def server_context(tls: ServerTls, what: str, deferred_handshake: bool = False) -> ssl.SSLContext | None:
    """The context for a listening socket, or None when TLS is off for it."""
    if not tls.enabled:
        return None
    cls = _DeferredHandshakeContext if deferred_handshake else ssl.SSLContext
    ctx = cls(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(lambda: ctx.load_cert_chain(tls.cert_file, tls.key_file), what, tls.cert_file, tls.key_file)  # type: ignore[arg-type]
    if tls.ca_file is not None:
        _load(lambda: ctx.load_verify_locations(cafile=tls.ca_file), what, tls.ca_file)
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    if tls.ca_file is None:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(tls: ClientTls, what: str) -> ssl.SSLContext | None:
    """The context for an outgoing connection, or None when TLS is off for it."""
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.ca_file is not None:
        _load(lambda: ctx.load_verify_locations(cafile=tls.ca_file), what, tls.ca_file)
    ctx.check_hostname = tls.check_hostname
    if tls.cert_file is not None:
        _load(lambda: ctx.load_cert_chain(tls.cert_file, tls.key_file), what, tls.cert_file, tls.key_file)
    return ctx


def peer_subject(sock) -> str:
    """The common name of the peer's verified certificate ('' without one), for the log."""
    getpeercert = getattr(sock, "getpeercert", None)
    if getpeercert is None:
        return ""
    try:
        cert = getpeercert() or {}
    except (ValueError, ssl.SSLError):
        return ""
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


def https_session(ca_file: str | None = None, auth: tuple[str, str] | None = None):
    """A `requests.Session` that verifies https:// against `ca_file` (None: the system's
    CAs), with basic `auth` if given (see `pin_ca`)."""
    import requests

    session = requests.Session()
    if auth:
        session.auth = auth
    return pin_ca(session, ca_file)


def pin_ca(session, ca_file: str | None):
    """`session`, made to verify https:// against `ca_file` whatever the environment says.

    `requests` lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override a session's own `verify` on
    every request that does not pass one (psf/requests#3829), and the DICOMweb and Orthanc
    clients pass none: a CA file configured for a destination would be silently replaced by
    the bundle the host sets. Here the configured file wins; proxies and the rest of the
    environment still apply. Without `ca_file` the session is left as it is."""
    if not ca_file:
        return session
    session.verify = ca_file
    merge = session.merge_environment_settings

    def merge_keeping_ca(url, proxies, stream, verify, cert):
        return merge(url, proxies, stream, ca_file if verify is None else verify, cert)

    session.merge_environment_settings = merge_keeping_ca
    return session
