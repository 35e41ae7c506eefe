"""The status page's session cookie and its protection against cross-site requests.

With a token configured (`node.http_auth`), the login form takes the token once and sets a
cookie `nodal_session` (HttpOnly, SameSite=Strict, Secure over HTTPS) that holds an issue
time and an HMAC of it keyed with the token: no token in URLs or in the cookie, and a new
token ends every session. The cookie opens the page and its data (`/`, `/status/...`) only;
the API keeps asking for the bearer token.

Actions (retry) are POST forms that carry a CSRF token (an HMAC of the session, or of a
per-process secret without auth) and must come with an Origin or Referer of this host.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

COOKIE = "nodal_session"
MAX_AGE_SECONDS = 12 * 3600
PAGE_PREFIXES = ("/status/",)
OPEN_PAGE_PATHS = frozenset({"/status/login", "/status/logout", "/status/static/status.css"})


def is_page_path(path: str) -> bool:
    """Paths the session cookie opens: the page and its own data, never /api or STOW-RS."""
    return path == "/" or path.startswith(PAGE_PREFIXES)


class Sessions:
    """Issue and check session cookies and CSRF tokens for one process."""

    def __init__(self, token: str | None):
        self._key = (token or secrets.token_hex(32)).encode()
        self.auth = token is not None
        self._token = token

    def _mac(self, msg: str) -> str:
        return hmac.new(self._key, msg.encode(), hashlib.sha256).hexdigest()

    def token_ok(self, given: str) -> bool:
        return self._token is not None and hmac.compare_digest(given.encode(), self._token.encode())

    def issue(self, t: float | None = None) -> str:
        issued = str(int(time.time() if t is None else t))
        return f"{issued}.{self._mac('session:' + issued)}"

    def valid(self, cookie: str | None, t: float | None = None) -> bool:
        if not cookie or "." not in cookie:
            return False
        issued, _, mac = cookie.partition(".")
        if not issued.isdigit() or not hmac.compare_digest(
            mac.encode(), self._mac("session:" + issued).encode()
        ):
            return False
        age = (time.time() if t is None else t) - int(issued)
        return 0 <= age <= MAX_AGE_SECONDS

    def csrf(self, cookie: str | None) -> str:
        return self._mac("csrf:" + (cookie or ""))

    def csrf_ok(self, cookie: str | None, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.csrf(cookie).encode())


def same_origin(headers: dict[str, str], host: str) -> bool:
    """True when Origin (or, without it, Referer) names this host; a POST with neither is refused."""
    source = headers.get("origin") or headers.get("referer") or ""
    if not source or source == "null":
        return False
    rest = source.split("://", 1)[-1]
    return rest.split("/", 1)[0].lower() == host.lower()


def cookie_from_header(header: str) -> str | None:
    for part in header.split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE:
            return value
    return None
