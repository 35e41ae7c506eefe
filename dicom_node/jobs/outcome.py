"""What a job attempt produced: plain values, no database (the job table records them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


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
    followup: dict | None = None  # FollowUp.to_json(): what became of the comparison with a prior


@dataclass
class FollowUp:
    """What became of an analysed study's comparison with its prior (issue 17).

    `outcome` is one of metrics.FOLLOWUP_OUTCOMES; anything but "compared" leaves the
    results as they are without a prior, and `reason` says why."""

    outcome: str
    reason: str = ""
    comparison: Any = None  # inference.followup.Comparison when compared
    prior_study_uid: str | None = None
    prior_source: str | None = None  # "sr" | "analysed"
    prior_files: list[str] = field(default_factory=list)  # prior results written, relative to the folder
    operations: list[dict] = field(default_factory=list)  # query.records.Operation.to_json()
    prior_volume: Any = field(default=None, repr=False)  # the prior CT, for the result images

    def to_json(self) -> dict:
        out: dict[str, Any] = {
            "outcome": self.outcome,
            "reason": self.reason,
            "prior_study_instance_uid": self.prior_study_uid,
            "prior_source": self.prior_source,
            "prior_results": len(self.prior_files),
            "operations": self.operations,
        }
        if self.comparison is not None:
            out["summary"] = self.comparison.summary.to_json()
        return out
