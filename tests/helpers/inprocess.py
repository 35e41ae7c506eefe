"""nodal's receivers in the test process: a DIMSE server over a fresh spool and index."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dicom_node.config import Settings
from dicom_node.index.db import Database
from dicom_node.receive.receiver import Receiver
from dicom_node.receive.scp import DimseServer
from dicom_node.spool.store import Spool


@contextmanager
def dimse_server(folder: Path, config: dict, acse_timeout: float | None = None) -> Iterator[DimseServer]:
    """A started DimseServer for `config` (a Settings dict); stopped and closed afterwards."""
    settings = Settings.model_validate(config)
    db = Database(f"sqlite:///{folder / 'i.sqlite3'}")
    spool = Spool(folder / "spool")
    receiver = Receiver(spool, db)
    server = DimseServer(settings, receiver)
    if acse_timeout is not None:
        server.ae.acse_timeout = acse_timeout
    server.start()
    try:
        yield server
    finally:
        server.stop(1)
        receiver.close()
        spool.close()
        db.close()
