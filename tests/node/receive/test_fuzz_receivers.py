"""Fuzzing the receivers: malformed instances, PDUs and multipart bodies never crash or hang
nodal, every failure gets a proper DIMSE status or HTTP 4xx, and the node serves afterwards.

1. `Receiver.store_dataset` (what the C-STORE handler calls: the dataset after the file
   meta, with a transfer syntax, sometimes a wrong one), `Receiver.store_bytes` (Part 10
   bytes) and `Receiver.store_temp` (what STOW-RS calls) take hypothesis-generated Part 10
   files and raw datasets: truncated,
   bit-flipped, overwritten, spliced, and structured ones with hostile values (path
   traversal and over-long UIDs, wrong VRs, absurd numbers). Each call must return a known
   status within `CASE_SECONDS`; nothing may land outside the spool; the indexer keeps up.
2. A running DIMSE port takes random bytes, truncated and corrupted association requests,
   PDU headers announcing 4 GiB, unknown PDU types, and C-STOREs whose dataset bytes were
   corrupted after the file meta: each connection ends (A-ASSOCIATE-RJ, A-ABORT, close or a
   C-STORE-RSP with a failure status) within `CASE_SECONDS`; C-ECHO works afterwards.
3. A running HTTP server takes corrupted STOW-RS bodies: answered 200/202/400/409/415,
   never 5xx, and /healthz still answers.

NODAL_FUZZ_CASES sets the total (default 10,200, so that more than 10,000 reach nodal): 3% over
each socket, the rest in process.
"""

from __future__ import annotations

import io
import os
import random
import signal
import socket
import struct
import threading
import time
from collections import Counter
from contextlib import contextmanager

import pydicom
import pytest
import requests
import uvicorn
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import select

from dicom_node.api.app import create_app
from dicom_node.config import Settings
from dicom_node.index.db import Database, Instance
from dicom_node.receive.contract import (
    CANNOT_UNDERSTAND,
    DATASET_MISMATCH,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    SUCCESS,
    Outcome,
    Source,
)
from dicom_node.receive.receiver import Receiver
from dicom_node.spool.store import Spool
from tests.helpers.dicom import part10
from tests.helpers.inprocess import dimse_server
from tests.helpers.peers import free_port, wait_until
from tests.helpers.stow import BOUNDARY, HEADERS, body

# pydicom warns about every malformed value it meets: tens of thousands here, all expected
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TOTAL = int(os.environ.get("NODAL_FUZZ_CASES", "10200"))
OVER_SOCKETS = max(20, TOTAL * 3 // 100)
IN_PROCESS = TOTAL - 2 * OVER_SOCKETS
CASE_SECONDS = 5.0
BATCH = 25  # in-process cases per hypothesis example
KNOWN_STATUSES = {SUCCESS, OUT_OF_RESOURCES, DATASET_MISMATCH, CANNOT_UNDERSTAND, PROCESSING_FAILURE}
FIGURES: Counter = Counter()  # printed at the end of each test: the figures in docs/reliability.md
COMMON = {
    "database": None,
    "deadline": None,
    "suppress_health_check": list(HealthCheck),
    "derandomize": True,
    "phases": [Phase.explicit, Phase.generate],  # no shrinking: a failure prints its case at once
}


class CaseTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    """Raise CaseTimeout in this (the main) thread after `seconds`: a hang fails the test."""

    def on_alarm(*_):
        raise CaseTimeout(f"a case took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _seed_instances() -> list[bytes]:
    """Valid instances to mutate: small, with pixel data, with a sequence, implicit VR."""
    with_pixels = part10(sop="1.2.3.4.10", Rows=4, Columns=4, BitsAllocated=16, PixelData=b"\0\1" * 16)
    ds = pydicom.dcmread(io.BytesIO(part10(sop="1.2.3.4.11")))
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3.4.10"
    ds.ReferencedImageSequence = [item]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    implicit = pydicom.dcmread(io.BytesIO(part10(sop="1.2.3.4.12")))
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buf2 = io.BytesIO()
    implicit.save_as(buf2, enforce_file_format=True, implicit_vr=True, little_endian=True)
    return [part10(), with_pixels, buf.getvalue(), buf2.getvalue()]


SEEDS = _seed_instances()


def mutate(rng: random.Random) -> bytes:
    """A valid seed instance, damaged 1-4 times."""
    data = bytearray(rng.choice(SEEDS))
    for _ in range(rng.randint(1, 4)):
        if not data:
            break
        op = rng.choice(["truncate", "flip", "overwrite", "insert", "delete", "length", "strip"])
        at = rng.randrange(len(data))
        if op == "truncate":
            del data[at:]
        elif op == "flip":
            data[at] ^= 1 << rng.randrange(8)
        elif op == "overwrite":
            data[at : at + 16] = rng.randbytes(rng.randint(1, 16))
        elif op == "insert":
            data[at:at] = rng.randbytes(rng.randint(1, 64))
        elif op == "delete":
            del data[at : at + rng.randint(1, 32)]
        elif op == "length":  # a huge or odd 32-bit length where one might be
            data[at : at + 4] = struct.pack("<I", rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 1, 3]))
        else:  # no preamble, or neither preamble nor file meta: a raw dataset
            data = data[132:] if rng.random() < 0.5 else data[128:]
    return bytes(data)


BAD_UIDS = [
    "../../etc/passwd",
    "/abs/path",
    "1.2.3/../..",
    "1." + "2" * 80,
    "",
    "1..2",
    "\0",
    "1.2.3",
    "1.2.3.4",
]


def _text(rng: random.Random, n: int) -> str:
    return "".join(
        chr(rng.choice([rng.randint(32, 126), rng.randint(0, 0x2FF), 0x2F, 0x5C])) for _ in range(n)
    )


def hostile(rng: random.Random) -> bytes:
    """A structurally valid file with hostile values (UIDs, VRs, numbers, transfer syntax)."""

    def uid() -> str:
        pick = rng.random()
        if pick < 0.4:
            return rng.choice(BAD_UIDS)
        if pick < 0.7:
            return _text(rng, rng.randint(0, 80))
        return ".".join(str(rng.randint(0, 10 ** rng.randint(1, 12))) for _ in range(rng.randint(1, 12)))

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2" if rng.random() < 0.5 else uid()
    ds.SOPInstanceUID = uid()
    ds.StudyInstanceUID = "1.2.3" if rng.random() < 0.5 else uid()
    ds.SeriesInstanceUID = "1.2.3.4" if rng.random() < 0.5 else uid()
    ds.Modality = _text(rng, rng.randint(0, 40))
    ds.ImageType = [_text(rng, rng.randint(0, 20)) for _ in range(rng.randint(0, 12))]
    # written as LO so that pydicom lets us write non-numbers where DS and IS belong
    ds.add_new(0x00180050, "LO", rng.choice(["2.5", "abc", "-1", "1e400", "nan", ""]))
    ds.add_new(0x00280008, "LO", rng.choice(["1", "0", "-7", "99999999999", "x", ""]))
    ds.SeriesDescription = _text(rng, rng.randint(0, 200))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    ds.file_meta.TransferSyntaxUID = rng.choice(
        [ExplicitVRLittleEndian, "1.2.840.10008.1.2.4.50", "9.9", "../x"]
    )
    buf = io.BytesIO()
    try:
        ds.save_as(buf, enforce_file_format=False)
    except Exception:  # pydicom refuses to write it: a valid seed instead
        return SEEDS[0]
    return buf.getvalue()


@pytest.fixture(scope="module")
def receiver(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    db = Database(f"sqlite:///{root / 'i.sqlite3'}")
    spool = Spool(root / "spool", "syncfs")
    r = Receiver(spool, db)
    yield r
    r.close()
    spool.close()
    db.close()
    outside = [p for p in root.rglob("*") if p.is_file() and not p.resolve().is_relative_to(root / "spool")]
    assert {p.name for p in outside} <= {"i.sqlite3", "i.sqlite3-journal", "i.sqlite3-wal", "i.sqlite3-shm"}


TRANSFER_SYNTAXES = [
    str(ExplicitVRLittleEndian),
    str(ImplicitVRLittleEndian),
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.4.50",
    "1.2.3.4",
    "",
]


def as_c_store(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """What a C-STORE would carry for this case: the bytes after the file meta group (or a
    random cut where there is none) and its transfer syntax (or a random one, wrong ones too)."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        ts = str(ds.file_meta.TransferSyntaxUID)
        end = 144 + struct.unpack("<I", data[140:144])[0]
    except Exception:
        ts, end = rng.choice(TRANSFER_SYNTAXES), rng.randrange(0, max(1, min(len(data), 400)))
    if rng.random() < 0.2:
        ts = rng.choice(TRANSFER_SYNTAXES)
    return data[end:], ts


def _check_store(receiver: Receiver, data: bytes, way: str, rng: random.Random) -> None:
    """Store one case through `way`: temp (STOW-RS), dataset (C-STORE) or bytes (Part 10)."""
    src = Source(via="stow" if way == "temp" else "dimse", transfer_id="fuzz")
    with time_limit(CASE_SECONDS):
        if way == "temp":
            temp = receiver.spool.temp_path()
            temp.write_bytes(data)
            result = receiver.store_temp(temp, src)
            assert not temp.exists()
        elif way == "dataset":
            result = receiver.store_dataset(*as_c_store(data, rng), src)
        else:
            result = receiver.store_bytes(data, src)
    assert result.status in KNOWN_STATUSES
    assert (result.outcome is Outcome.REFUSED) == (result.status != SUCCESS)
    if result.outcome is not Outcome.REFUSED:
        h = result.header
        path = (
            receiver.spool.root / h.study_instance_uid / h.series_instance_uid / f"{h.sop_instance_uid}.dcm"
        )
        assert path.resolve().is_relative_to(receiver.spool.root.resolve())
    FIGURES[f"ingest {result.outcome.value}"] += 1


def test_ingest_survives_malformed_instances(receiver):
    """Hypothesis picks the seeds; each example feeds a batch of BATCH cases made from its seed
    (generating every case through hypothesis' own draws costs 10 ms a case, too slow for 10,000)."""
    examples = -(-IN_PROCESS // BATCH)

    @settings(max_examples=examples, **COMMON)
    @given(seed=st.integers(0, 2**64 - 1))
    def batches(seed):
        rng = random.Random(seed)
        for _ in range(BATCH):
            make = hostile if rng.random() < 0.25 else mutate
            _check_store(receiver, make(rng), rng.choice(("temp", "dataset", "bytes")), rng)

    FIGURES.clear()
    t = time.monotonic()
    batches()
    assert receiver.flush(timeout=30), "the indexer did not keep up (stuck on a fuzzed header?)"
    with receiver.db.session() as s:  # each stored instance once, its file where the index says
        paths = list(s.scalars(select(Instance.path)))
    assert paths and all((receiver.spool.root / p).is_file() for p in paths)
    on_disk = [p for p in receiver.spool.files()]
    assert len(on_disk) == len(paths)
    tried = sum(FIGURES.values())
    print(f"\ningest fuzz: {tried} cases in {time.monotonic() - t:.1f} s: {dict(FIGURES)}")
    assert tried >= IN_PROCESS


# -- over the sockets --


@pytest.fixture(scope="module")
def dimse(tmp_path_factory):
    port = free_port()
    node = {"dimse_port": port, "bind_address": "127.0.0.1", "network_timeout_seconds": 2}
    # an association request cut short holds its slot until the ACSE (ARTIM) timeout, 30 s in
    # production; shortened here so that the test can check that every connection ends
    with dimse_server(tmp_path_factory.mktemp("fuzz-dimse"), {"node": node}, acse_timeout=2) as server:
        yield port, server


def _assoc_rq(calling: bytes = b"FUZZER          ") -> bytes:
    """A well-formed A-ASSOCIATE-RQ for Verification, to be corrupted."""
    app = b"\x10\x00\x00\x15" + b"1.2.840.10008.3.1.1.1"
    ts = b"1.2.840.10008.1.2"
    pc = b"\x20\x00" + struct.pack(">H", 4 + 4 + 17 + 4 + len(ts)) + b"\x01\x00\x00\x00"
    pc += b"\x30\x00\x00\x11" + b"1.2.840.10008.1.1" + b"\x40\x00" + struct.pack(">H", len(ts)) + ts
    ui = b"\x50\x00\x00\x08" + b"\x51\x00\x00\x04" + struct.pack(">I", 16384)
    body_ = b"\x00\x01\x00\x00" + b"NODAL           " + calling + b"\x00" * 32 + app + pc + ui
    return b"\x01\x00" + struct.pack(">I", len(body_)) + body_


@st.composite
def pdu_bytes(draw) -> bytes:
    kind = draw(st.sampled_from(["random", "truncated", "flipped", "huge", "unknown", "two"]))
    rq = _assoc_rq()
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=512))
    if kind == "truncated":
        return rq[: draw(st.integers(1, len(rq) - 1))]
    if kind == "flipped":
        b = bytearray(rq)
        for _ in range(draw(st.integers(1, 6))):
            b[draw(st.integers(0, len(b) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(b)
    if kind == "huge":
        return bytes([draw(st.sampled_from([1, 4, 5, 7]))]) + b"\x00" + b"\xff\xff\xff\xff" + b"x" * 64
    if kind == "unknown":
        return bytes([draw(st.integers(8, 255))]) + b"\x00" + struct.pack(">I", 4) + b"abcd"
    return rq + draw(st.binary(min_size=1, max_size=64))  # an RQ, then garbage as the next PDU


def _exchange(port: int, data: bytes) -> bytes:
    """Send `data`, half-close, read until the node closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=CASE_SECONDS) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            return b""  # the node already closed it
        got = b""
        deadline = time.monotonic() + CASE_SECONDS
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(4096)
            except ConnectionResetError:
                return got
            if not chunk:
                return got
            got += chunk
        raise CaseTimeout("the node kept a garbage connection open")


def _echo_ok(port: int) -> bool:
    ae = AE(ae_title="CHECK")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="NODAL")
    try:
        return assoc.is_established and assoc.send_c_echo().Status == 0
    finally:
        if assoc.is_established:
            assoc.release()


def test_dimse_port_survives_garbage_and_corrupted_stores(dimse, tmp_path, monkeypatch):
    port, server = dimse
    # send each file's dataset bytes as they are (after the file meta), not re-encoded: the
    # corruption reaches the node instead of stopping in the sending library
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    replies: Counter = Counter()

    @settings(max_examples=OVER_SOCKETS // 2, **COMMON)
    @given(data=pdu_bytes())
    def garbage(data):
        reply = _exchange(port, data)
        # nothing, an A-ASSOCIATE-AC/RJ (2/3) or an A-ABORT (7): never anything else
        assert reply[:1] in (b"", b"\x02", b"\x03", b"\x07"), reply[:16]
        replies[{b"": "closed", b"\x02": "AC", b"\x03": "RJ", b"\x07": "A-ABORT"}[reply[:1]]] += 1

    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, ImplicitVRLittleEndian)
    statuses: Counter = Counter()
    meta_end = {}
    for seed in SEEDS:
        ds = pydicom.dcmread(io.BytesIO(seed))
        meta_end[seed] = 132 + 12 + ds.file_meta.FileMetaInformationGroupLength

    @settings(max_examples=OVER_SOCKETS - OVER_SOCKETS // 2, **COMMON)
    @given(seed=st.sampled_from(SEEDS), cuts=st.data())
    def stores(seed, cuts):
        start = meta_end[seed]
        data = bytearray(seed)
        for _ in range(cuts.draw(st.integers(1, 4))):
            at = cuts.draw(st.integers(start, len(data) - 1))
            data[at] ^= 1 << cuts.draw(st.integers(0, 7))
        if cuts.draw(st.booleans()):
            del data[cuts.draw(st.integers(start + 1, len(data) - 1)) :]
        f = tmp_path / "case.dcm"
        f.write_bytes(bytes(data))
        # garbage connections may still hold association slots (until the ACSE timeout)
        assoc = wait_until(
            lambda: (a := ae.associate("127.0.0.1", port, ae_title="NODAL")).is_established and a,
            CASE_SECONDS,
            "a free association slot",
            every=0.2,
        )
        try:
            status = assoc.send_c_store(f)
            code = getattr(status, "Status", None)
            assert code in KNOWN_STATUSES, code  # a response with a proper status, not silence
            statuses[f"0x{code:04X}"] += 1
        finally:
            if assoc.is_established:
                assoc.release()

    t = time.monotonic()
    garbage()
    stores()
    assert _echo_ok(port), "the node no longer answers C-ECHO after the fuzzing"
    wait_until(lambda: not server.ae.active_associations, 15, "every fuzzed association to end")
    n = sum(replies.values()) + sum(statuses.values())
    FIGURES.update({"dimse cases": n})
    took = time.monotonic() - t
    print(f"\nDIMSE fuzz: {n} connections in {took:.1f} s: {dict(replies)}; C-STORE {dict(statuses)}")
    assert n >= OVER_SOCKETS * 0.9


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-http")
    db = Database(f"sqlite:///{root / 'i.sqlite3'}")
    spool = Spool(root / "spool")
    receiver = Receiver(spool, db)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(Settings(), db, receiver, lambda: True),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="off",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 10, "uvicorn")
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    receiver.close()
    spool.close()
    db.close()


@st.composite
def stow_request(draw) -> tuple[bytes, dict]:
    data = bytearray(body([draw(st.sampled_from(SEEDS)) for _ in range(draw(st.integers(1, 3)))]))
    headers = dict(HEADERS)
    op = draw(st.sampled_from(["flip", "truncate", "boundary", "header", "ctype", "insert", "empty"]))
    if op == "flip":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
    elif op == "truncate":
        del data[draw(st.integers(0, len(data) - 1)) :]
    elif op == "boundary":
        b = draw(st.sampled_from(["", "x" * 71, "other", BOUNDARY[:-1], '"' + BOUNDARY]))
        headers["Content-Type"] = f'multipart/related; type="application/dicom"; boundary={b}'
    elif op == "header":
        at = data.find(b"Content-Type")
        data[at:at] = draw(st.sampled_from([b"no colon here\r\n", b"X: " + b"y" * 20000 + b"\r\n", b"\r\n"]))
    elif op == "ctype":
        headers["Content-Type"] = draw(
            st.text(max_size=120).map(lambda t: t.encode("latin-1", "replace").decode("latin-1"))
        )
    elif op == "insert":
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(max_size=256))
    else:
        data = bytearray()
    return bytes(data), headers


def test_stow_survives_malformed_bodies(http):
    answers: Counter = Counter()

    @settings(max_examples=OVER_SOCKETS, **COMMON)
    @given(req=stow_request())
    def posts(req):
        data, headers = req
        try:
            r = requests.post(f"{http}/dicom-web/studies", data=data, headers=headers, timeout=CASE_SECONDS)
        except requests.exceptions.InvalidHeader:
            answers["refused by the client library"] += 1
            return
        assert r.status_code in (200, 202, 400, 409, 415), (r.status_code, r.text[:200])
        answers[r.status_code] += 1

    t = time.monotonic()
    posts()
    assert requests.get(f"{http}/healthz", timeout=5).status_code == 200
    answered = sum(v for k, v in answers.items() if isinstance(k, int))
    took = time.monotonic() - t
    print(f"\nSTOW-RS fuzz: {answered} requests answered in {took:.1f} s: {dict(answers)}")
    assert answered >= OVER_SOCKETS * 0.9
