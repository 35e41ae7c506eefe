"""What each query or retrieval did: one `Operation` per request, for the log, the audit
trail and the metrics (observed by whoever owns the metrics: the serve process)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from dicom_node.index.db import Database
from dicom_node.observe import audit

log = logging.getLogger("nodal.query")

FIND, GET, MOVE, QIDO, WADO = "find", "get", "move", "qido", "wado"
RETRIEVALS = (GET, MOVE, WADO)


class QueryError(RuntimeError):
    """The PACS could not be asked or could not deliver (the message says which and why)."""


@dataclass
class Operation:
    destination: str
    operation: str  # FIND | GET | MOVE | QIDO | WADO
    level: str  # STUDY | SERIES
    outcome: str = audit.SUCCESS
    seconds: float = 0.0
    matches: int = 0  # queries: answers
    instances: int = 0  # retrievals: instances received
    error: str = ""

    def to_json(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass
class Recorder:
    """Collects the operations of one job or request; audits each as it ends."""

    db: Database | None = None
    job_id: int | None = None
    study_key: str | None = None
    operations: list[Operation] = field(default_factory=list)

    @contextmanager
    def operation(self, destination: str, operation: str, level: str) -> Iterator[Operation]:
        """Time one request; a QueryError (or any exception) inside marks it failed and propagates."""
        op = Operation(destination, operation, level)
        t = time.perf_counter()
        try:
            yield op
        except Exception as e:
            op.outcome = audit.FAILURE
            op.error = str(e) if isinstance(e, QueryError) else f"{type(e).__name__}: {e}"
            raise
        finally:
            op.seconds = time.perf_counter() - t
            self.operations.append(op)
            self._log_and_audit(op)

    def _log_and_audit(self, op: Operation) -> None:
        retrieval = op.operation in RETRIEVALS
        what = f"{op.instances} instance(s)" if retrieval else f"{op.matches} match(es)"
        log.log(
            logging.INFO if op.outcome == audit.SUCCESS else logging.WARNING,
            "%s %s at %s (%s level): %s in %.2f s%s",
            "retrieve" if retrieval else "query",
            op.operation,
            op.destination,
            op.level,
            what,
            op.seconds,
            f"; failed: {op.error}" if op.error else "",
            extra={"event": "retrieve" if retrieval else "query", "outcome": op.outcome},
        )
        if self.db is None:
            return
        audit.record(
            self.db,
            audit.Event(
                "retrieve" if retrieval else "query",
                op.outcome,
                actor=op.destination,
                study_key=self.study_key,
                job_id=self.job_id,
                count=op.instances if retrieval else op.matches,
                detail={
                    "operation": op.operation,
                    "level": op.level,
                    **({"error": op.error} if op.error else {}),
                },
            ),
        )
