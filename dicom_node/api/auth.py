"""Bearer-token authentication for the HTTP side (STOW-RS and the REST API).

With `node.http_auth.token` (environment) or `token_file` set, every request except the
paths in `OPEN_PATHS` must carry `Authorization: Bearer <token>`; the token is compared
in constant time, and a missing or wrong one is answered 401 with `WWW-Authenticate:
Bearer` (RFC 6750). The probes and metrics stay open so that orchestrators and Prometheus
need no secret; they return no patient data.
"""

from __future__ import annotations

import hmac
import logging

from starlette.types import ASGIApp, Receive, Scope, Send

from dicom_node.config import HttpAuth, read_secret
from dicom_node.index.db import Database
from dicom_node.observe import audit, metrics
from dicom_node.status.session import OPEN_PAGE_PATHS, Sessions, cookie_from_header, is_page_path

log = logging.getLogger("nodal.auth")

# Reachable without the token: liveness, readiness, Prometheus metrics.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
REALM = "nodal"


def http_token(auth: HttpAuth) -> str | None:
    """The configured token (from the environment or its file), None when auth is off."""
    return read_secret(auth.token, auth.token_file, "node.http_auth")


def token_matches(header: str, token: str) -> bool:
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


class BearerAuth:
    """ASGI middleware: 401 for HTTP requests outside OPEN_PATHS without the right token."""

    def __init__(
        self, app: ASGIApp, token: str, db: Database | None = None, sessions: Sessions | None = None
    ):
        self.app = app
        self._token = token
        self._db = db  # where refusals are audited
        self._sessions = sessions  # the status page's cookie, accepted on its own paths only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_PATHS or path in OPEN_PAGE_PATHS:
            await self.app(scope, receive, send)
            return
        header = cookies = ""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                header = value.decode("latin-1")
            elif name == b"cookie":
                cookies = value.decode("latin-1")
        if token_matches(header, self._token):
            await self.app(scope, receive, send)
            return
        page = self._sessions is not None and is_page_path(path)
        if page and self._sessions is not None and self._sessions.valid(cookie_from_header(cookies)):
            await self.app(scope, receive, send)
            return
        if page and not header and scope["method"] == "GET" and not path.endswith(".json"):
            # a browser without a session: to the login form (not audited: nothing was tried)
            await send(
                {"type": "http.response.start", "status": 303, "headers": [(b"location", b"/status/login")]}
            )
            await send({"type": "http.response.body", "body": b""})
            return
        client = scope.get("client") or ("-", 0)
        why = "no bearer token" if not header else "wrong token or scheme"
        log.warning("HTTP %s %s from %s refused: %s", scope["method"], scope["path"], client[0], why)
        metrics.HTTP_REFUSED.labels("invalid" if header else "missing").inc()
        metrics.HTTP_REFUSED_BY_REASON.labels("token_invalid" if header else "token_missing").inc()
        if self._db is not None:
            area = "/" + scope["path"].lstrip("/").split("/", 1)[0]  # /api or /dicom-web: no UIDs
            detail = {"method": scope["method"], "area": area, "reason": why}
            event = audit.Event("authentication", audit.FAILURE, actor="http", peer=client[0], detail=detail)
            audit.record(self._db, event)
        error = "invalid_token" if header else "invalid_request"
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"www-authenticate", f'Bearer realm="{REALM}", error="{error}"'.encode()),
                ],
            }
        )
        await send(
            {
                "type": "http.response.body",
                "body": b'{"error": "authentication required: send Authorization: Bearer <token>"}',
            }
        )
