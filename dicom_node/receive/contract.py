"""The receive contract shared by both receivers: where an instance came from, what its
store answered, and the DIMSE status codes (PS3.4 Annex B) that answer carries."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from dicom_node.spool.header import InstanceHeader

# DIMSE status codes (PS3.4 Annex B) used by both receivers.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110


class Outcome(enum.StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    REFUSED = "refused"


@dataclass(frozen=True)
class Source:
    via: str  # dimse | stow
    transfer_id: str  # the association or request that brought the instance
    calling_ae: str = ""
    peer_host: str = ""


@dataclass(frozen=True)
class StoreResult:
    outcome: Outcome
    status: int  # DIMSE status: 0x0000 or the failure code
    header: InstanceHeader | None = None
    reason: str = ""
