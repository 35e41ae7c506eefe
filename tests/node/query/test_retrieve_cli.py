"""`nodal retrieve`: asks the running node; says so when it cannot (issue 17). The success
path runs against a real node in tests/peers/test_followup_peers.py."""

from __future__ import annotations

import pytest

from dicom_node.cli import main
from tests.helpers.peers import free_port


def test_retrieve_needs_study_or_accession(capsys):
    with pytest.raises(SystemExit) as e:
        main(["retrieve"])
    assert e.value.code == 2
    assert "one of the arguments --study --accession is required" in capsys.readouterr().err


def test_retrieve_without_a_running_node_says_so(capsys):
    port = free_port()
    assert main(["retrieve", "--study", "1.2.3", "--node", f"http://127.0.0.1:{port}"]) == 1
    assert f"cannot reach the node at http://127.0.0.1:{port}" in capsys.readouterr().err
