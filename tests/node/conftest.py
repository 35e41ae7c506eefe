"""Fixtures of the node's tests."""

from __future__ import annotations

import pytest

from dicom_node.index.db import Database
from dicom_node.receive.receiver import Receiver
from dicom_node.spool.store import Spool


@pytest.fixture
def node(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    spool = Spool(tmp_path / "spool")
    receiver = Receiver(spool, db)
    yield db, receiver, tmp_path
    receiver.close()
    spool.close()
    db.close()
