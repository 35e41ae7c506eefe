"""A streaming multipart/related parser (RFC 2046) for STOW-RS request bodies.

`MultipartParser.feed(chunk)` returns events in order: `PartStart(headers)`, `PartData(data)`
and `PartEnd()`; the body is never held in memory, only a tail shorter than the delimiter.
The search for the delimiter resumes where the previous one stopped, so a large part costs
O(n), not O(n^2). `PartData.data` is a read-only memoryview into the chunk that was fed
(no copy): write it out or copy it, it stays valid.

Hand-written rather than python-multipart's streaming parser (0.0.34), measured on the
same 300-instance body (benchmarks/bench_stow.py, benchmarks/RESULTS.md, 2026-12-05):
streamed to files, both ran at the same speed within the noise of the shared machine (the
write costs several times the parse); parsing alone, this one was as fast or slightly
faster (since it hands out slices of the chunks it is fed). The speed being equal,
python-multipart loses on what it accepts: it refuses a preamble before the first
boundary and transport padding after a boundary, both allowed by RFC 2046 (5.1.1), and it
would be a new dependency. Part bodies are found by their delimiter only, so parts with or
without Content-Length are read alike.
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
    data: bytes | memoryview


@dataclass(frozen=True)
class PartEnd:
    pass


Event = PartStart | PartData | PartEnd
MAX_HEADER_BYTES = 16384
# RFC 2046 allows 70 characters; Orthanc's DICOMweb plugin sends 73 (two UUIDs and a dash).
# Longer is accepted up to this bound, which only keeps a hostile header from setting the
# size of the buffer the parser keeps.
MAX_BOUNDARY = 256


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """('multipart/related', {'type': 'application/dicom', 'boundary': ...}) from a header.

    Parameter names are lower-cased; values are unquoted."""
    m = Message()
    m["content-type"] = value
    params = {k.lower(): v for k, v in (m.get_params() or [])[1:]}
    return m.get_content_type(), params


def check_boundary(boundary: str) -> bytes:
    """The boundary as bytes; MultipartError naming what is wrong with it."""
    if not boundary:
        raise MultipartError("the Content-Type has no boundary parameter")
    if len(boundary) > MAX_BOUNDARY:
        raise MultipartError(f"the boundary is {len(boundary)} characters long, more than {MAX_BOUNDARY}")
    if not boundary.isascii() or not boundary.isprintable():
        raise MultipartError("the boundary holds characters other than printable ASCII")
    return boundary.encode("ascii")


class MultipartParser:
    def __init__(self, boundary: str):
        self._delim = b"\r\n--" + check_boundary(boundary)
        self._buf = b"\r\n"  # so that a delimiter on the first line is found too
        self._pos = 0  # where the unconsumed bytes of _buf start
        self._scan = 0  # where the next delimiter search starts (index into _buf)
        self._state = "preamble"

    def feed(self, chunk: bytes) -> list[Event]:
        events: list[Event] = []
        tail = self._buf[self._pos :]  # in a part's body: empty, or the start of a delimiter
        if tail:
            self._scan -= self._pos
            self._buf = tail + chunk
        else:
            self._scan = 0
            self._buf = bytes(chunk)  # no copy when it is bytes already
        self._pos = 0
        step = {
            "preamble": self._preamble,
            "after_delim": self._after_delim,
            "headers": self._headers,
            "body": self._body,
            "epilogue": self._epilogue,
        }
        while step[self._state](events):
            pass
        return events

    def close(self) -> None:
        if self._state != "epilogue":
            raise MultipartError("the body ended before the closing boundary")

    def _find_delim(self) -> int:
        """Where the next delimiter starts, or -1 with `_scan` set to the first byte that could
        begin one cut off by the chunk's end (so everything before it is part data)."""
        buf, delim = self._buf, self._delim
        i = buf.find(delim, max(self._scan, self._pos))
        if i < 0:
            k = buf.find(b"\r", max(self._pos, len(buf) - len(delim) + 1))
            while k >= 0 and not delim.startswith(buf[k:]):
                k = buf.find(b"\r", k + 1)
            self._scan = len(buf) if k < 0 else k
        return i

    def _preamble(self, events: list[Event]) -> bool:
        i = self._find_delim()
        if i < 0:
            self._pos = self._scan  # preamble is ignored
            return False
        self._advance(i + len(self._delim), "after_delim")
        return True

    def _after_delim(self, events: list[Event]) -> bool:
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 2:
            return False
        if buf[pos : pos + 2] == b"--":
            self._advance(len(buf), "epilogue")
            return False
        end = buf.find(b"\r\n", pos)
        if end < 0:
            if len(buf) - pos > 1024:
                raise MultipartError("garbage after a boundary")
            return False
        self._advance(end + 2, "headers")  # transport padding, then CRLF
        return True

    def _headers(self, events: list[Event]) -> bool:
        buf, pos = self._buf, self._pos
        if buf.startswith(b"\r\n", pos):
            end, skip = pos, 2
        else:
            end, skip = buf.find(b"\r\n\r\n", pos), 4
        if end < 0:
            if len(buf) - pos > MAX_HEADER_BYTES:
                raise MultipartError("part headers longer than 16 KiB")
            return False
        headers: dict[str, str] = {}
        for line in buf[pos:end].decode("latin-1").split("\r\n"):
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                raise MultipartError("malformed part header line")
            headers[name.strip().lower()] = value.strip()
        events.append(PartStart(headers))
        self._advance(end + skip, "body")
        return True

    def _body(self, events: list[Event]) -> bool:
        i = self._find_delim()
        if i < 0:
            if self._scan > self._pos:
                events.append(PartData(memoryview(self._buf)[self._pos : self._scan]))
                self._pos = self._scan
            return False
        if i > self._pos:
            events.append(PartData(memoryview(self._buf)[self._pos : i]))
        events.append(PartEnd())
        self._advance(i + len(self._delim), "after_delim")
        return True

    def _epilogue(self, events: list[Event]) -> bool:
        self._pos = len(self._buf)
        return False

    def _advance(self, pos: int, state: str) -> None:
        self._pos = self._scan = pos
        self._state = state
