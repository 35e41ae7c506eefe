"""What a job attempt produced: plain values, no database (the job table records them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ResultFile:
    file: str  # relative to the outbox
    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class JobOutcome:
    """What a finished attempt produced."""

    result_dir: str
    files: Sequence[ResultFile]
    findings: int
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall time
    malignant: int | None = None  # findings at or above inference.malignancy_threshold
