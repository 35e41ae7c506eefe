"""Limits on the HTTP side: slow or stalled requests and too many uploads (node.http_limits).

- **Header timeout.** uvicorn bounds only the idle time between requests
  (`timeout_keep_alive`, reset by every byte), so a client that sends its headers a byte
  at a time, or nothing at all, holds its connection forever. `header_timeout_protocol`
  is uvicorn's h11 protocol (`uvicorn.Config(http=...)`) with one timer more: a
  connection's request headers must be complete within `header_timeout_seconds` of the
  connection (or of the previous response), else the connection is closed.
- **STOW-RS uploads** (`UploadGuard`, ASGI middleware on POST /dicom-web/studies...): at
  most `max_uploads` at once and `max_uploads_per_client` from one address (503 and 429,
  with Retry-After); a body larger than `max_body_mb` gets 413; an upload that moves no
  bytes for `body_timeout_seconds` is cut off with 408. A refused or cut-off request is
  answered with `Connection: close`, so its connection and descriptor are freed at once,
  and the STOW-RS handler removes the partial file of a cut-off upload.

Every refusal is counted in `nodal_connections_refused_total{receiver="http", reason}`
and logged once per burst (`dicom_node.receive.limits`).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from dicom_node.config import HttpLimits
from dicom_node.receive import limits

STOW_PATH = "/dicom-web/studies"
RETRY_AFTER_SECONDS = 10


def header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing connections whose request headers take too long."""

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _waiting_cycle: object = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not self._waiting_cycle:  # a request's headers are complete
                self._disarm()

        def on_response_complete(self) -> None:
            self._arm()  # the next request on this connection (before: pipelined ones disarm it)
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._waiting_cycle = self.cycle
            self._header_timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if self.cycle is self._waiting_cycle and not self.transport.is_closing():
                limits.refused("http", limits.HEADER_TIMEOUT, self.client[0] if self.client else "-")
                self.transport.close()

    return HeaderTimeoutProtocol


class UploadGuard:
    """ASGI middleware: caps, size limit and body timeout for STOW-RS uploads."""

    def __init__(self, app: ASGIApp, settings: HttpLimits):
        self.app = app
        self.settings = settings
        self.max_bytes = settings.max_body_mb << 20
        self.active = 0
        self.per_client: Counter[str] = Counter()  # only touched on the event loop: no lock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith(STOW_PATH):
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("-", 0))[0]
        refusal = self._refusal(scope, client)
        if refusal is not None:
            reason, status, message = refusal
            limits.refused("http", reason, client)
            await _respond(send, status, message, retry=status in (429, 503))
            return
        self.active += 1
        self.per_client[client] += 1
        cut: list[str] = []  # the reason the body was cut off, once it is
        received = 0
        started = False

        async def guarded_receive() -> Message:
            nonlocal received
            if cut:
                return {"type": "http.disconnect"}
            try:
                message = await asyncio.wait_for(receive(), self.settings.body_timeout_seconds)
            except TimeoutError:
                cut.append(limits.BODY_TIMEOUT)
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    cut.append(limits.BODY_TOO_LARGE)
                    return {"type": "http.disconnect"}
            return message

        async def closing_send(message: Message) -> None:
            nonlocal started
            if cut and not started:
                return  # the guard answers a cut-off upload itself (408 or 413), below
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, closing_send)
        except ClientDisconnect:
            if not cut:
                raise
        finally:
            self.active -= 1
            self.per_client[client] -= 1
            if not self.per_client[client]:
                del self.per_client[client]
        if cut:
            limits.refused("http", cut[0], client)
            if not started:
                if cut[0] == limits.BODY_TIMEOUT:
                    what = f"no bytes for {self.settings.body_timeout_seconds:g} s"
                    await _respond(send, 408, f"upload cut off: {what}; nothing of it was stored")
                else:
                    await _respond(send, 413, self._too_large())

    def _refusal(self, scope: Scope, client: str) -> tuple[str, int, str] | None:
        length = _content_length(scope)
        if length is not None and length > self.max_bytes:
            return limits.BODY_TOO_LARGE, 413, self._too_large()
        if self.per_client[client] >= self.settings.max_uploads_per_client:
            n = self.settings.max_uploads_per_client
            return limits.CLIENT_UPLOAD_LIMIT, 429, f"{n} uploads from {client} are running; retry later"
        if self.active >= self.settings.max_uploads:
            return limits.UPLOAD_LIMIT, 503, f"{self.settings.max_uploads} uploads are running; retry later"
        return None

    def _too_large(self) -> str:
        return f"request body larger than {self.settings.max_body_mb} MiB (node.http_limits.max_body_mb)"


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _respond(send: Send, status: int, message: str, retry: bool = False) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    if retry:
        headers.append((b"retry-after", str(RETRY_AFTER_SECONDS).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
