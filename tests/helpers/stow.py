"""STOW-RS request bodies for the tests."""

from __future__ import annotations

BOUNDARY = "nodal-boundary-1234"


def body(parts: list[bytes], ctype="application/dicom") -> bytes:
    out = b"preamble to ignore\r\n"
    for p in parts:
        out += f"--{BOUNDARY}\r\nContent-Type: {ctype}\r\n\r\n".encode() + p + b"\r\n"
    return out + f"--{BOUNDARY}--\r\nepilogue".encode()


HEADERS = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'}
