"""Deterministic DICOM UIDs: the same parts always give the same UID.

UIDs are `2.25.<decimal of a name-based UUID>` (PS3.5 B.2). pydicom's
`generate_uid(prefix=None, entropy_srcs=...)` ignores its entropy sources and is random, so
it cannot be used where a re-run must be recognisable.
"""

from __future__ import annotations

import uuid

_NAMESPACE = uuid.UUID("5b0f3d1e-6c1a-4f7e-9a51-6e6f64616c31")


def deterministic_uid(*parts: str) -> str:
    """A UID that depends only on `parts` (joined with a separator that cannot occur in UIDs)."""
    return f"2.25.{uuid.uuid5(_NAMESPACE, chr(31).join(parts)).int}"
