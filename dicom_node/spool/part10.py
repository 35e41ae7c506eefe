"""The Part 10 framing of a received dataset: preamble, "DICM" and the file meta group.

A C-STORE brings the dataset alone; the spool keeps it as a DICOM file, so nodal puts the
128-byte preamble and a File Meta Information group (PS3.10 7.1) in front of the bytes as
received. The group is encoded here directly (explicit VR little endian, seven elements)
rather than through a pydicom Dataset: this runs once per instance while the sender waits,
and building and encoding a FileMetaDataset cost about 0.4 ms of the ~5 ms a C-STORE may
take (benchmarks/RESULTS.md). tests/node/spool/test_part10.py checks the bytes against pydicom's own
encoder.
"""

from __future__ import annotations

import re
import struct

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

PREAMBLE = b"\x00" * 128 + b"DICM"
_AE_UNSAFE = re.compile(r"[^\x20-\x5b\x5d-\x7e]")  # AE: printable ASCII except backslash


def _element(number: int, vr: bytes, value: bytes) -> bytes:
    """One group-0002 element, explicit VR little endian, value padded to even length."""
    if len(value) % 2:
        value += b"\x00" if vr == b"UI" else b" "
    if vr == b"OB":  # 4-byte length after two reserved bytes
        return struct.pack("<HH2sHI", 0x0002, number, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, number, vr, len(value)) + value


_VERSION = _element(0x0001, b"OB", b"\x00\x01")
_IMPLEMENTATION = _element(0x0012, b"UI", str(PYNETDICOM_IMPLEMENTATION_UID).encode()) + _element(
    0x0013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION.encode()
)


def file_meta_prefix(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae: str = ""
) -> bytes:
    """Preamble, "DICM" and the file meta group for a dataset received over the network.

    The UIDs must already be checked (digits and dots, at most 64 characters);
    `source_ae` (the calling AE title, stored as Source Application Entity Title so that a
    file recovered from the spool still knows its sender) is left out when empty."""
    ae = _AE_UNSAFE.sub("", source_ae).strip()[:16]
    body = b"".join(
        (
            _VERSION,
            _element(0x0002, b"UI", sop_class_uid.encode("ascii")),
            _element(0x0003, b"UI", sop_instance_uid.encode("ascii")),
            _element(0x0010, b"UI", transfer_syntax_uid.encode("ascii")),
            _IMPLEMENTATION,
            _element(0x0016, b"AE", ae.encode("ascii")) if ae else b"",
        )
    )
    return PREAMBLE + struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body
