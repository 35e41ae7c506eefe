"""Senders: one class per destination kind, each `send(items) -> {sop_uid: error or None}`.

- `DimseSender`: C-STORE SCU (pynetdicom) over one association, files sent as stored;
- `DicomwebSender`: STOW-RS (dicomweb-client), per-instance outcome from the response;
- `OrthancSender`: Orthanc REST `POST /instances` (orthanc-api-client).

A sender never raises for a peer problem: every instance gets an error string saying what
went wrong (connection refused, association rejected, a failure status), so that the
outbox retries exactly the instances that did not arrive.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pydicom

from dicom_node.config import (
    DicomwebDestination,
    DimseDestination,
    OrthancDestination,
    ReplyDestination,
    Settings,
)
from dicom_node.tls import client_context, pin_ca

log = logging.getLogger("nodal.send")

# C-STORE statuses that mean "stored" (PS3.4 B.2.3): success and the warnings.
STORED_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}


@dataclass(frozen=True)
class Outgoing:
    sop_uid: str
    sop_class_uid: str
    path: Path


class Sender(Protocol):
    def send(self, items: Sequence[Outgoing]) -> dict[str, str | None]: ...


def _all(items: Sequence[Outgoing], error: str) -> dict[str, str | None]:
    return {i.sop_uid: error for i in items}


@dataclass(frozen=True)
class DimseSender:
    calling_ae: str
    ae_title: str
    host: str
    port: int
    timeout: float = 60.0
    max_pdu: int = 131072
    tls: ssl.SSLContext | None = None  # DICOM TLS (the context checks the peer's certificate)

    def send(self, items: Sequence[Outgoing]) -> dict[str, str | None]:
        from pynetdicom import AE

        where = f"{self.ae_title}@{self.host}:{self.port}"
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.maximum_pdu_size = self.max_pdu
        syntaxes: dict[str, set[str]] = {}
        for item in items:
            syntaxes.setdefault(item.sop_class_uid, set()).add(_transfer_syntax(item.path))
        for sop_class, ts in syntaxes.items():
            ae.add_requested_context(sop_class, sorted(ts))
        tls_args = (self.tls, self.host if self.tls.check_hostname else None) if self.tls else None
        try:
            assoc = ae.associate(self.host, self.port, ae_title=self.ae_title, tls_args=tls_args)  # type: ignore[arg-type]
        except OSError as e:
            return _all(items, f"cannot connect to {where}: {e}")
        if not assoc.is_established:
            if tls_args and not assoc.is_rejected:
                return _all(
                    items,
                    f"no association with {where} over TLS (peer down, or the TLS handshake "
                    "failed: check the CA, both certificates and the host name)",
                )
            if assoc.is_rejected:
                return _all(items, f"association rejected by {where} (is {self.calling_ae} known there?)")
            return _all(items, f"no association with {where} (peer down, port closed, or aborted)")
        sock = assoc.dul.socket.socket if assoc.dul.socket else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        out: dict[str, str | None] = {}
        try:
            for item in items:
                out[item.sop_uid] = self._store_one(assoc, item, where)
        finally:
            if assoc.is_established:
                assoc.release()
        return out

    @staticmethod
    def _store_one(assoc, item: Outgoing, where: str) -> str | None:
        if not assoc.is_established:
            return f"association with {where} ended early"
        try:
            status = assoc.send_c_store(item.path)
        except (ValueError, RuntimeError) as e:  # e.g. no accepted presentation context
            return f"{where} cannot take it: {e}"
        code = getattr(status, "Status", None)
        if code is None:
            return f"no C-STORE response from {where} (timeout or connection lost)"
        if code in STORED_STATUSES:
            return None
        return f"{where} answered C-STORE status 0x{code:04X}"


def _transfer_syntax(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


@dataclass(frozen=True)
class DicomwebSender:
    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 60.0
    ca_file: str | None = None  # verify https:// against these CAs (None: the system's)

    def send(self, items: Sequence[Outgoing]) -> dict[str, str | None]:
        import requests

        from dicom_node.query.dicomweb import web_client

        client = web_client(self.url, self.username, self.password, self.ca_file, self.timeout)
        try:
            datasets = [pydicom.dcmread(i.path) for i in items]
            response = client.store_instances(datasets)
        except requests.HTTPError as e:
            code = e.response.status_code if e.response is not None else "?"
            return _all(items, f"STOW-RS to {self.url} answered HTTP {code}")
        except requests.RequestException as e:
            return _all(items, f"STOW-RS to {self.url} failed: {type(e).__name__}")
        failed = {
            str(f.get("ReferencedSOPInstanceUID", "")): int(f.get("FailureReason", 0x0110))
            for f in (response.get("FailedSOPSequence") or [])
        }
        return {
            i.sop_uid: (f"STOW-RS failure reason 0x{failed[i.sop_uid]:04X}" if i.sop_uid in failed else None)
            for i in items
        }


@dataclass(frozen=True)
class OrthancSender:
    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 60.0
    ca_file: str | None = None

    def send(self, items: Sequence[Outgoing]) -> dict[str, str | None]:
        from orthanc_api_client import OrthancApiClient

        client = OrthancApiClient(self.url, user=self.username, pwd=self.password)
        pin_ca(client._http_session, self.ca_file)  # the client has no public option for it
        out: dict[str, str | None] = {}
        for item in items:
            try:
                response = client.post("instances", data=item.path.read_bytes(), timeout=self.timeout)
                status = response.json().get("Status", "Success")
                out[item.sop_uid] = None if status in ("Success", "AlreadyStored") else f"Orthanc: {status}"
            except Exception as e:  # orthanc-api-client wraps requests errors in its own types
                code = getattr(e, "http_status_code", None)
                out[item.sop_uid] = f"Orthanc REST {self.url} failed: " + (
                    f"HTTP {code}" if code else type(e).__name__
                )
        return out


class NoRoute(LookupError):
    """A `reply` destination has no address for the caller."""


def make_sender(dest, settings: Settings, reply_ae: str) -> Sender:
    """The sender for a configured destination (`reply`: the calling AE's entry in allowed_callers)."""
    calling = settings.node.ae_title
    if isinstance(dest, DimseDestination):
        tls = client_context(dest.tls, f"destination {dest.name}: tls")
        return DimseSender(
            calling,
            dest.ae_title,
            dest.host,
            dest.port,
            dest.timeout_seconds,
            settings.node.max_pdu_bytes,
            tls,
        )
    if isinstance(dest, ReplyDestination):
        for c in settings.allowed_callers:
            if c.ae_title.strip() == reply_ae.strip() and c.host and c.port:
                return DimseSender(
                    calling, c.ae_title, c.host, c.port, dest.timeout_seconds, settings.node.max_pdu_bytes
                )
        who = reply_ae.strip() or "(unknown, e.g. STOW-RS)"
        raise NoRoute(f"reply: the sender {who} has no host and port in allowed_callers")
    if isinstance(dest, DicomwebDestination | OrthancDestination):
        cls = DicomwebSender if isinstance(dest, DicomwebDestination) else OrthancSender
        ca = str(dest.ca_file) if dest.ca_file else None
        return cls(dest.url, dest.username, dest.secret(), dest.timeout_seconds, ca)
    raise TypeError(f"unknown destination kind {type(dest).__name__}")
