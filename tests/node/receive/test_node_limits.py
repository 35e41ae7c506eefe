"""Connection-level limits in process: the DIMSE gate (allow-listed hosts at accept, per-host
and pending budgets, ARTIM, only established associations count) and the burst log."""

import io
import logging
import socket
import time

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_node.config import Settings
from dicom_node.index.db import Database
from dicom_node.receive import limits
from dicom_node.receive.receiver import Receiver
from dicom_node.receive.scp import DimseServer
from dicom_node.spool.store import Spool
from tests.helpers.dicom import part10
from tests.helpers.metrics import sample
from tests.helpers.peers import free_port, wait_until

ATTACKER = "127.0.0.2"  # another address on the loopback network


@pytest.fixture
def make_scp(tmp_path):
    made = []

    def make(callers, **node):
        port = free_port()
        settings = Settings.model_validate(
            {"node": {"dimse_port": port, "bind_address": "127.0.0.1", **node}, "allowed_callers": callers}
        )
        db = Database(f"sqlite:///{tmp_path / f'i{len(made)}.sqlite3'}")
        spool = Spool(tmp_path / f"spool{len(made)}")
        receiver = Receiver(spool, db)
        server = DimseServer(settings, receiver)
        server.start()
        made.append((server, receiver, spool, db))
        return port, server

    yield make
    for server, receiver, spool, db in made:
        server.stop(1)
        receiver.close()
        spool.close()
        db.close()


def idle(port: int, source: str = ATTACKER) -> socket.socket:
    """A TCP connection that never sends a byte."""
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    return s


def closed_by_peer(s: socket.socket, within: float) -> bool:
    s.settimeout(within)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def associate(port, calling="CT1"):
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    return ae.associate("127.0.0.1", port, ae_title="NODAL")


def refused(reason: str) -> float:
    return sample("nodal_connections_refused_total", receiver="dimse", reason=reason) or 0.0


def test_hosts_no_caller_names_are_closed_at_accept(make_scp):
    port, _ = make_scp([{"ae_title": "CT1", "host": "127.0.0.1"}])
    before = refused("host_not_allowed")
    conns = [idle(port) for _ in range(5)]
    try:
        assert all(closed_by_peer(s, 2) for s in conns)  # nothing sent, closed at once
    finally:
        for s in conns:
            s.close()
    assert refused("host_not_allowed") == before + 5
    assoc = associate(port)
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    assoc.release()


def test_idle_connections_take_neither_association_slots_nor_more_than_their_host_budget(make_scp, caplog):
    port, server = make_scp(
        [{"ae_title": "CT1"}],  # any host: the per-host and pending budgets are what protects
        max_associations=2,
        max_pending_connections=6,
        max_connections_per_host=3,
        artim_seconds=3.0,
    )
    per_host, artim = refused("per_host_limit"), refused("artim_timeout")
    with caplog.at_level(logging.WARNING, logger="nodal.limits"):
        t0 = time.monotonic()
        conns = [idle(port) for _ in range(10)]
        try:
            assert time.monotonic() - t0 < 0.5  # no SYN dropped for a full listen backlog
            # 7 over the host's budget are closed at accept; the 3 others wait for ARTIM
            time.sleep(0.3)
            early = [closed_by_peer(s, 0.02) for s in conns]
            assert sum(early) == 7
            # both association slots are free for the allowed caller while they wait
            first, second = associate(port), associate(port)
            assert first.is_established and second.is_established
            ds = pydicom.dcmread(io.BytesIO(part10()))
            assert first.send_c_store(ds).Status == 0
            third = associate(port)  # only established associations count: this one is over
            assert third.is_rejected
            rj = third.acceptor.primitive
            assert (rj.result, rj.result_source, rj.diagnostic) == (2, 3, 2)  # transient, local limit
            first.release()
            second.release()
            waiting = [s for s, e in zip(conns, early, strict=True) if not e]
            assert all(closed_by_peer(s, 6) for s in waiting)
            assert 2.5 < time.monotonic() - t0 < 5
        finally:
            for s in conns:
                s.close()
    wait_until(lambda: refused("artim_timeout") == artim + 3, 5, "3 ARTIM timeouts counted", 0.05)
    assert refused("per_host_limit") == per_host + 7
    wait_until(lambda: server.gate.counts()["open"] == 0, 5, "the gate to be empty", 0.05)
    # one line for the burst, not one per connection
    assert caplog.text.count("per_host_limit") == 1


def test_pending_budget_leaves_room_for_other_hosts(make_scp):
    port, server = make_scp(
        [{"ae_title": "CT1"}], max_pending_connections=4, max_connections_per_host=4, artim_seconds=2
    )
    before = refused("pending_limit")
    mine = [idle(port, "127.0.0.3") for _ in range(4)]  # the whole pending budget
    try:
        other = idle(port, "127.0.0.4")
        assert closed_by_peer(other, 1)  # no room to negotiate: closed at accept
        other.close()
        assert refused("pending_limit") == before + 1
        wait_until(lambda: server.gate.counts()["pending"] == 0, 5, "ARTIM to close the idle ones", 0.05)
        assoc = associate(port)
        assert assoc.is_established
        assoc.release()
    finally:
        for s in mine:
            s.close()


def test_burst_log_logs_the_first_and_summarises_the_rest(caplog):
    burst = limits.BurstLog(logging.getLogger("nodal.test"), seconds=0.3)
    with caplog.at_level(logging.WARNING, logger="nodal.test"):
        for i in range(50):
            burst.refused("http", limits.HEADER_TIMEOUT, f"127.0.0.{2 + i % 5}")
        wait_until(lambda: "49 more refused" in caplog.text, 3, "the summary", 0.05)
    assert len(caplog.records) == 2
    assert "from 127.0.0.2 refused: header_timeout" in caplog.records[0].getMessage()
    assert "127.0.0.3 (10)" in caplog.records[1].getMessage()


def test_burst_log_flush_summarises_at_once_and_its_timer_then_logs_nothing(caplog):
    burst = limits.BurstLog(logging.getLogger("nodal.test"), seconds=0.05)
    with caplog.at_level(logging.WARNING, logger="nodal.test"):
        for _ in range(3):
            burst.refused("dimse", limits.HOST_NOT_ALLOWED, "127.0.0.2")
        burst.flush()  # as DimseServer.stop does
        assert "2 more refused" in caplog.records[-1].getMessage()
        time.sleep(0.5)  # ten times the burst's timer
    assert len(caplog.records) == 2
