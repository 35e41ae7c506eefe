"""Open associations and STOW-RS requests, and the studies each one brought (in memory), so
that completion can use the shorter quiet period once all of them were released."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from dicom_node.observe.audit import study_key
from dicom_node.receive.contract import Outcome


@dataclass
class TransferSummary:
    """What one association or request brought: acknowledged instances per study, and the
    instances by outcome."""

    studies: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)


class Transfers:
    """Open associations / requests and the studies each one brought (in memory)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, TransferSummary] = {}

    def begin(self, transfer_id: str) -> None:
        with self._lock:
            self._open.setdefault(transfer_id, TransferSummary())

    def touch(self, transfer_id: str, study_uid: str) -> None:
        with self._lock:
            studies = self._open.setdefault(transfer_id, TransferSummary()).studies
            studies[study_uid] = studies.get(study_uid, 0) + 1

    def tally(self, transfer_id: str, outcome: Outcome) -> None:
        with self._lock:
            outcomes = self._open.setdefault(transfer_id, TransferSummary()).outcomes
            outcomes[outcome.value] = outcomes.get(outcome.value, 0) + 1

    def end(self, transfer_id: str) -> tuple[set[str], TransferSummary | None]:
        """Forget the transfer; return its studies that no other open transfer is bringing,
        and its summary (None when it was not open)."""
        with self._lock:
            summary = self._open.pop(transfer_id, None)
            still_open = set().union(*(t.studies for t in self._open.values()))
        return set(summary.studies if summary else ()) - still_open, summary

    def open_studies(self) -> set[str]:
        with self._lock:
            return set().union(*(t.studies for t in self._open.values()))


def summary_line(summary: TransferSummary) -> str:
    """`12 stored, 0 duplicate, 0 refused; studies 3f2a...(12)` (study keys, never UIDs)."""
    counts = ", ".join(f"{summary.outcomes.get(o.value, 0)} {o.value}" for o in Outcome)
    studies = ", ".join(f"{study_key(uid)} ({n})" for uid, n in summary.studies.items())
    return f"{counts}; studies: {studies or 'none'}"
