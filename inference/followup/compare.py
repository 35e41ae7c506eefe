"""The comparison of a current study with its prior (filled in by the next commits)."""

from __future__ import annotations

from inference.findings import StudyFindings
from inference.followup.types import Comparison, FollowUpSettings, PriorStudy
from inference.volume import Volume


def compare(
    prior: PriorStudy,
    current_volume: Volume,
    current: StudyFindings,
    *,
    settings: FollowUpSettings | None = None,
) -> Comparison:
    """Register the prior to the current study, match the nodes one to one, and measure
    the changes and the response. Raises `FollowUpError` on bad input."""
    raise NotImplementedError("inference.followup.compare lands in the next commit of issue-17a")
