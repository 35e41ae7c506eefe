"""The interface of a queue backend: what `nodal serve` asks of the workers behind it.

Two backends implement it: `embedded.WorkerPool` (worker processes of this node, SQLite or
PostgreSQL job table) and `celery_backend.Dispatcher` (jobs announced to `nodal worker`
processes through a Celery broker). Both run the same job function (`embedded.run_next`).
"""

from __future__ import annotations

from typing import ClassVar, Protocol


class JobQueue(Protocol):
    READY_CHECK: ClassVar[tuple[str, str]]  # /readyz: check name, why it fails

    def start(self) -> None:
        """Start the workers (or connect to the broker)."""

    def ready(self) -> bool:
        """Whether jobs can run now (a worker has the model loaded, or the broker answers)."""

    def ready_count(self) -> int:
        """Workers ready to run a job."""

    def models(self) -> list[dict[str, str]]:
        """Name, version and device of each loaded model (`nodal_model_info`)."""

    def gpu_bytes(self) -> dict[str, int]:
        """GPU memory held per worker (CUDA only)."""

    def supervise(self) -> None:
        """One round of housekeeping: restart dead workers, stop overdue jobs, publish due jobs."""

    def stop(self, grace_seconds: float) -> None:
        """Let running jobs finish for `grace_seconds`, then stop them and re-queue their jobs."""
