"""`nodal echo PEER`: C-ECHO a configured DICOM destination or AE@HOST:PORT."""

from __future__ import annotations

import re
import ssl
import time
from dataclasses import dataclass

from dicom_node.config import DimseDestination, Settings

_PEER = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int
    tls: ssl.SSLContext | None = None  # a `dimse` destination with `tls` enabled


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    message: str


def resolve_peer(text: str, settings: Settings) -> Peer:
    """A DIMSE destination by name, an allowed caller with host and port, or AE@HOST:PORT."""
    for d in settings.destinations:
        if d.name == text:
            if not isinstance(d, DimseDestination):
                raise ValueError(f"destination {text!r} is {d.kind}, not a DICOM (dimse) peer")
            from dicom_node.tls import client_context

            return Peer(d.ae_title, d.host, d.port, client_context(d.tls, f"destination {d.name}: tls"))
    for c in settings.allowed_callers:
        if c.ae_title == text and c.host and c.port:
            return Peer(c.ae_title, c.host, c.port)
    m = _PEER.match(text)
    if m is None:
        raise ValueError(f"{text!r} is neither a configured DICOM destination nor AE@HOST:PORT")
    return Peer(m["ae"], m["host"], int(m["port"]))


def echo(calling_ae: str, peer: Peer, timeout: float = 10.0) -> EchoResult:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    where = f"{peer.ae_title}@{peer.host}:{peer.port}"
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    t = time.perf_counter()
    try:
        tls_args = (peer.tls, peer.host if peer.tls.check_hostname else None) if peer.tls else None
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)  # type: ignore[arg-type]
    except OSError as e:
        return EchoResult(False, f"C-ECHO {where}: cannot connect: {e}")
    if not assoc.is_established:
        if assoc.is_rejected:
            why = "association rejected (is our AE title known to the peer?)"
        else:
            why = "no association (connection refused, wrong port, or timeout)"
        return EchoResult(False, f"C-ECHO {where}: {why}")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    ms = (time.perf_counter() - t) * 1000
    code = getattr(status, "Status", None)
    if code == 0x0000:
        return EchoResult(True, f"C-ECHO {where}: success in {ms:.0f} ms")
    return EchoResult(
        False, f"C-ECHO {where}: " + ("no response" if code is None else f"status 0x{code:04X}")
    )
