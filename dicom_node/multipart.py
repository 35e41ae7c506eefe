"""A streaming multipart/related parser (RFC 2046) for STOW-RS request bodies.

`MultipartParser.feed(chunk)` returns events in order: `PartStart(headers)`, `PartData(bytes)`
and `PartEnd()`; the body is never held in memory, only a tail shorter than the delimiter.
The search for the delimiter resumes where the previous one stopped, so a large part costs
O(n), not O(n^2).
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message


class MultipartError(ValueError):
    """The body is not valid multipart (missing boundary, truncated, malformed headers)."""


@dataclass(frozen=True)
class PartStart:
    headers: dict[str, str]  # lower-case names


@dataclass(frozen=True)
class PartData:
    data: bytes


@dataclass(frozen=True)
class PartEnd:
    pass


Event = PartStart | PartData | PartEnd
MAX_HEADER_BYTES = 16384


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """('multipart/related', {'type': 'application/dicom', 'boundary': ...}) from a header."""
    m = Message()
    m["content-type"] = value
    params = {k.lower(): v for k, v in (m.get_params() or [])[1:]}
    return m.get_content_type(), params


class MultipartParser:
    def __init__(self, boundary: str):
        if not boundary or len(boundary) > 70:
            raise MultipartError("the boundary parameter is missing or longer than 70 characters")
        self._delim = b"\r\n--" + boundary.encode("latin-1")
        self._buf = bytearray(b"\r\n")  # so that a delimiter on the first line is found too
        self._state = "preamble"
        self._scan = 0  # where the next delimiter search starts

    def feed(self, chunk: bytes) -> list[Event]:
        self._buf += chunk
        events: list[Event] = []
        while True:
            progressed = getattr(self, f"_{self._state}")(events)
            if not progressed:
                return events

    def close(self) -> None:
        if self._state != "epilogue":
            raise MultipartError("the body ended before the closing boundary")

    def _find_delim(self) -> int:
        i = self._buf.find(self._delim, self._scan)
        if i < 0:
            self._scan = max(0, len(self._buf) - len(self._delim) + 1)
        return i

    def _preamble(self, events: list[Event]) -> bool:
        i = self._find_delim()
        if i < 0:
            del self._buf[: self._scan]
            self._scan = 0
            return False
        del self._buf[: i + len(self._delim)]
        self._scan = 0
        self._state = "after_delim"
        return True

    def _after_delim(self, events: list[Event]) -> bool:
        if len(self._buf) < 2:
            return False
        if self._buf[:2] == b"--":
            self._state = "epilogue"
            self._buf.clear()
            return False
        end = self._buf.find(b"\r\n")
        if end < 0:
            if len(self._buf) > 1024:
                raise MultipartError("garbage after a boundary")
            return False
        del self._buf[: end + 2]  # transport padding, then CRLF
        self._state = "headers"
        return True

    def _headers(self, events: list[Event]) -> bool:
        end = self._buf.find(b"\r\n\r\n")
        if self._buf.startswith(b"\r\n"):
            end, skip = 0, 2
        else:
            skip = 4
        if end < 0:
            if len(self._buf) > MAX_HEADER_BYTES:
                raise MultipartError("part headers longer than 16 KiB")
            return False
        headers: dict[str, str] = {}
        for line in bytes(self._buf[:end]).decode("latin-1").split("\r\n"):
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                raise MultipartError("malformed part header line")
            headers[name.strip().lower()] = value.strip()
        del self._buf[: end + skip]
        events.append(PartStart(headers))
        self._state = "body"
        self._scan = 0
        return True

    def _body(self, events: list[Event]) -> bool:
        i = self._find_delim()
        if i < 0:
            safe = self._scan
            if safe:
                events.append(PartData(bytes(self._buf[:safe])))
                del self._buf[:safe]
                self._scan = 0
            return False
        if i:
            events.append(PartData(bytes(self._buf[:i])))
        events.append(PartEnd())
        del self._buf[: i + len(self._delim)]
        self._scan = 0
        self._state = "after_delim"
        return True

    def _epilogue(self, events: list[Event]) -> bool:
        self._buf.clear()
        return False
