"""Follow-up studies: the current study compared with the patient's prior.

    from inference.followup import PriorStudy, compare, prior_nodes
    comparison = compare(prior, current_volume, current_findings)

Registration (prior CT to current CT), one-to-one node matching, per-node changes and the
RECIST 1.1 / Lugano summary (docs/follow-up-criteria.md). Pure: no networking, no torch.
"""

from inference.followup.compare import compare
from inference.followup.types import (
    FROM_ANALYSIS,
    FROM_SR,
    GONE,
    MATCHED,
    NEW,
    Comparison,
    FollowUpError,
    FollowUpSettings,
    NodeChange,
    PriorNode,
    PriorStudy,
    Registration,
    ResponseSummary,
    prior_nodes,
)

__all__ = [
    "FROM_ANALYSIS",
    "FROM_SR",
    "GONE",
    "MATCHED",
    "NEW",
    "Comparison",
    "FollowUpError",
    "FollowUpSettings",
    "NodeChange",
    "PriorNode",
    "PriorStudy",
    "Registration",
    "ResponseSummary",
    "compare",
    "prior_nodes",
]
