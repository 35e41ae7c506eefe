"""Deterministic UIDs for result objects.

A result UID is a function of (the set of source SOP Instance UIDs, the model version, a
purpose string), so re-running the same model on the same input gives the same SOP
Instance and Series UIDs (the PACS recognises the re-send as a duplicate), while another
input or another model version gives new ones.

Form: ``2.25.<decimal of a name-based UUID>`` (PS3.5 B.2, ISO/IEC 9834-8).  Note that
``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)`` cannot be used for this: with
``prefix=None`` pydicom ignores ``entropy_srcs`` and returns a *random* UUID-derived UID, so
`inference.uids.deterministic_uid` (UUID version 5) is the one derivation used.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydicom.uid import UID

from inference.uids import deterministic_uid

#: Purposes used by the writers.
SEG_SERIES = "seg-series"
SEG_INSTANCE = "seg-instance"
SR_SERIES = "sr-series"
SR_INSTANCE = "sr-instance"
SC_SERIES = "sc-series"
DEVICE = "device"
NO_FINDINGS_TRACKING = "no-findings-tracking"


def sc_instance(index: int) -> str:
    """Purpose string of the result image number `index` (1-based)."""
    if index < 1:
        raise ValueError(f"result image index must be >= 1, got {index}")
    return f"sc-instance-{index}"


def uid_from_names(*names: str) -> UID:
    """A ``2.25`` UID that is a pure function of `names` (order matters)."""
    if not names:
        raise ValueError("at least one name is needed to derive a UID")
    return UID(deterministic_uid(*names))


def result_uid(source_sop_instance_uids: Iterable[str], model_version: str, purpose: str) -> UID:
    """Derive the UID for `purpose` from the source instances and the model version.

    The source UIDs are de-duplicated and sorted, so the order in which the instances
    arrived does not matter.
    """
    sources = sorted({str(u).strip() for u in source_sop_instance_uids})
    if not sources or not all(sources):
        raise ValueError("cannot derive a result UID without source SOP Instance UIDs")
    if not purpose:
        raise ValueError("purpose must be a non-empty string such as 'seg-instance'")
    return uid_from_names("nodal-result-v1", purpose, str(model_version), *sources)


def device_uid(model_name: str, model_version: str) -> UID:
    """Device UID of the algorithm: changes with every model version (IHE AIR)."""
    return uid_from_names("nodal-device-v1", model_name, str(model_version))


class ResultUIDs:
    """All UIDs of one result set, derived from the same sources and model version."""

    def __init__(
        self, source_sop_instance_uids: Iterable[str], model_version: str, variant: str = ""
    ) -> None:
        """`variant` (e.g. the prior study of a follow-up) gives a result set other UIDs than
        that of the same sources and model without it."""
        self._sources = sorted({str(u) for u in source_sop_instance_uids})
        self._version = str(model_version) if not variant else f"{model_version}|{variant}"
        if not self._sources:
            raise ValueError("no source SOP Instance UIDs given")

    def __call__(self, purpose: str) -> UID:
        return result_uid(self._sources, self._version, purpose)

    @property
    def seg_series(self) -> UID:
        return self(SEG_SERIES)

    @property
    def seg_instance(self) -> UID:
        return self(SEG_INSTANCE)

    @property
    def sr_series(self) -> UID:
        return self(SR_SERIES)

    @property
    def sr_instance(self) -> UID:
        return self(SR_INSTANCE)

    @property
    def sc_series(self) -> UID:
        return self(SC_SERIES)

    def sc_instance(self, index: int) -> UID:
        return self(sc_instance(index))
