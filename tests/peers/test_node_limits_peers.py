"""No sender can make nodal deaf (issue 19): against a running `nodal serve`, while idle TCP
connections, stalled STOW-RS uploads or too many associations arrive, the allowed sender's
study is stored completely.

The attackers use another loopback address (127.0.0.2) so that per-host limits see them as
another host. The flood from any host is renewed for the issue's 2 minutes; with callers
bound to a host, where every flood connection is closed at accept, 24 s (12 ARTIM periods).
"""

from __future__ import annotations

import os
import re
import selectors
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.helpers.dicom import part10
from tests.helpers.peers import Nodal, free_port, missing_binaries, node_config, wait_until

pytestmark = [pytest.mark.peers]

if missing_binaries("storescu"):
    pytest.skip("needs dcmtk storescu (`make peers`)", allow_module_level=True)

ATTACKER = "127.0.0.2"
BOUNDARY = "nodal-limits"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # dcmtk leaves Nagle on otherwise: 20 instances/s
STOW_HEADERS = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'}


def start_node(tmp_path: Path, callers: list[dict], **node) -> tuple[Nodal, int]:
    port = free_port()
    cfg = node_config(tmp_path / "var", port, tmp_path / "no-model", allowed_callers=callers)
    cfg["node"].update(node)
    cfg["jobs"]["workers"] = 0  # receiving only: the limits are what is tested
    cfg["completion"]["quiet_seconds"] = 3600.0  # no completion while the studies arrive
    cfg["completion"]["after_release_seconds"] = 3600.0
    return Nodal(tmp_path, cfg).start(ready_path="/healthz"), port


def write_study(folder: Path, study: str, n: int, pixels: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    extra = {}
    if pixels:
        extra = dict(
            Rows=pixels,
            Columns=pixels,
            BitsAllocated=16,
            BitsStored=16,
            HighBit=15,
            PixelRepresentation=0,
            SamplesPerPixel=1,
            PhotometricInterpretation="MONOCHROME2",
            PixelData=bytes(pixels * pixels * 2),
        )
    paths = []
    for i in range(n):
        p = folder / f"{i:04d}.dcm"
        p.write_bytes(part10(sop=f"{study}.{i + 1}", study=study, series=f"{study}.0", **extra))
        paths.append(p)
    return paths


def stored(nodal: Nodal, study: str) -> int:
    root = Path(nodal.config["node"]["data_dir"]) / "spool" / study
    return len(list(root.rglob("*.dcm"))) if root.exists() else 0


def refused(nodal: Nodal, receiver: str, reason: str) -> float:
    text = requests.get(f"{nodal.http}/metrics", timeout=10).text
    m = re.search(
        rf'^nodal_connections_refused_total\{{reason="{reason}",receiver="{receiver}"\}} (\S+)$', text, re.M
    ) or re.search(
        rf'^nodal_connections_refused_total\{{receiver="{receiver}",reason="{reason}"\}} (\S+)$', text, re.M
    )
    return float(m.group(1)) if m else 0.0


def open_fds(nodal: Nodal) -> int:
    return len(list(Path(f"/proc/{nodal.proc.pid}/fd").iterdir()))


def storescu(port: int, paths: list[Path], ae: str = "MODALITY") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["storescu", "-aet", ae, "-aec", "NODAL", "127.0.0.1", str(port), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        env=DCMTK_ENV,
    )


class IdleFlood:
    """`n` TCP connections from ATTACKER that never send a byte, all renewed every `every` s."""

    def __init__(self, port: int, n: int, every: float):
        self.port, self.n, self.every = port, n, every
        self.stop = threading.Event()
        self.rounds = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            conns = []
            for _ in range(self.n):
                s = socket.socket()
                s.bind((ATTACKER, 0))
                s.settimeout(5)
                try:
                    s.connect(("127.0.0.1", self.port))
                except OSError:
                    s.close()
                    continue
                conns.append(s)
            self.rounds += 1
            self.stop.wait(self.every)
            for s in conns:
                s.close()

    def __enter__(self) -> IdleFlood:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(15)


@pytest.mark.parametrize(
    ("host_bound", "seconds"),
    [(False, 120.0), (True, 24.0)],
    ids=["callers-from-any-host", "callers-bound-to-a-host"],
)
def test_idle_connections_renewed_do_not_stop_the_allowed_sender(tmp_path, host_bound, seconds):
    caller = {"ae_title": "MODALITY", **({"host": "127.0.0.1"} if host_bound else {})}
    nodal, port = start_node(tmp_path, [caller], artim_seconds=2.0)
    study = "1.2.826.0.1.19.1"
    paths = write_study(tmp_path / "study", study, 100)
    try:
        runs = []
        t0 = time.monotonic()
        with IdleFlood(port, 50, every=2.0) as flood:
            time.sleep(1.0)
            while time.monotonic() - t0 < seconds:  # one 100-instance transfer after another
                started = time.monotonic()
                done = storescu(port, paths)
                assert done.returncode == 0, done.stdout + done.stderr
                assert "Failed" not in done.stderr and "Rejected" not in done.stderr, done.stderr
                runs.append(time.monotonic() - started)
                time.sleep(1.0)
        assert flood.rounds >= 10 and len(runs) >= 4
        assert stored(nodal, study) == 100
        reason = "host_not_allowed" if host_bound else "per_host_limit"
        closed_at_accept = refused(nodal, "dimse", reason)
        artim = refused(nodal, "dimse", "artim_timeout")
        if host_bound:
            assert closed_at_accept >= 50 * flood.rounds - 50 and artim == 0
        else:
            assert closed_at_accept >= 30 * flood.rounds  # 16 of each 50 admitted
        print(
            f"\nidle flood ({'bound' if host_bound else 'any host'}): {flood.rounds} rounds of 50, "
            f"{closed_at_accept:.0f} closed at accept ({reason}), {artim:.0f} by ARTIM; "
            f"{len(runs)} x 100 instances stored by storescu in {min(runs):.2f}-{max(runs):.2f} s each; "
            f"{stored(nodal, study)} files"
        )
        log = nodal.log()
        assert log.count(f"refused: {reason}") <= seconds / 10 + 2  # once per burst, not per connection
    finally:
        assert nodal.stop() == 0


def stalled_upload(source: str, port: int) -> socket.socket:
    """A STOW-RS request whose headers and first body line arrive, then nothing."""
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    head = (
        f"POST /dicom-web/studies HTTP/1.1\r\nHost: nodal\r\n"
        f"Content-Type: {STOW_HEADERS['Content-Type']}\r\nContent-Length: 10000000\r\n\r\n"
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\nDICM"
    )
    s.sendall(head.encode())
    return s


def stow_body(parts: list[bytes]) -> bytes:
    out = b""
    for p in parts:
        out += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def read_until_closed(conns: list[socket.socket], timeout: float) -> tuple[dict[int, int], float]:
    """Read every connection until the node closes it: {status (0: none): count}, seconds taken."""
    sel = selectors.DefaultSelector()
    data: dict[socket.socket, bytes] = {}
    for s in conns:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        data[s] = b""
    codes: dict[int, int] = {}
    t0 = time.monotonic()
    while data and time.monotonic() - t0 < timeout:
        for key, _ in sel.select(0.5):
            s = key.fileobj
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, BlockingIOError):
                chunk = b""
            if chunk:
                data[s] += chunk
                continue
            sel.unregister(s)
            status = re.match(rb"HTTP/1.1 (\d+)", data.pop(s))
            code = int(status.group(1)) if status else 0
            codes[code] = codes.get(code, 0) + 1
    assert not data, f"{len(data)} connections still open after {timeout} s"
    return codes, time.monotonic() - t0


def test_stalled_uploads_are_cut_off_while_others_store(tmp_path):
    nodal, port = start_node(
        tmp_path,
        [{"ae_title": "MODALITY"}],
        http_limits={"header_timeout_seconds": 3.0, "body_timeout_seconds": 3.0},
    )
    http_port = nodal.config["node"]["http_port"]
    tmp_dir = Path(nodal.config["node"]["data_dir"]) / "spool" / ".tmp"
    fds_before = open_fds(nodal)
    try:
        t0 = time.monotonic()
        stalled = [stalled_upload(ATTACKER, http_port) for _ in range(1000)]
        # and 20 connections that never finish their headers
        slow = []
        for _ in range(20):
            s = socket.socket()
            s.bind((ATTACKER, 0))
            s.connect(("127.0.0.1", http_port))
            s.sendall(b"POST /dicom-web/studies HTTP/1.1\r\nHost: nodal\r\n")
            slow.append(s)
        opened = time.monotonic() - t0
        # another client's STOW-RS and a DIMSE sender, while the stalled uploads are held
        study = "1.2.826.0.1.19.2"
        parts = [part10(sop=f"{study}.{i}", study=study, series=f"{study}.0") for i in range(1, 11)]
        r = requests.post(
            f"{nodal.http}/dicom-web/studies", data=stow_body(parts), headers=STOW_HEADERS, timeout=30
        )
        assert r.status_code == 200, r.text
        dimse_study = "1.2.826.0.1.19.3"
        done = storescu(port, write_study(tmp_path / "dimse", dimse_study, 20))
        assert done.returncode == 0, done.stderr
        partial = len(list(tmp_dir.iterdir())) if tmp_dir.exists() else 0
        codes, took = read_until_closed(stalled + slow, timeout=20)
        assert stored(nodal, study) == 10 and stored(nodal, dimse_study) == 20
        # 8 uploads admitted per client, each cut off after 3 s without bytes (408); the rest
        # refused at once (429); the 20 slow headers closed without an answer
        assert codes == {429: 992, 408: 8, 0: 20}, codes
        assert took < 3.0 + 3.0  # within the configured timeouts
        assert not list(tmp_dir.iterdir())  # the partial files are gone
        wait_until(lambda: open_fds(nodal) <= fds_before + 10, 10, "the node's descriptors to be freed", 0.2)
        assert refused(nodal, "http", "client_upload_limit") == 992
        assert refused(nodal, "http", "body_timeout") == 8
        assert refused(nodal, "http", "header_timeout") == 20
        print(
            f"\nstalled uploads: 1000 + 20 slow headers opened in {opened:.1f} s; {partial} partial file(s) "
            f"while held; answers {codes}; all closed {took:.1f} s after the other client's STOW-RS "
            f"(timeouts 3 s); descriptors {fds_before} before, {open_fds(nodal)} after"
        )
    finally:
        for s in stalled + slow:
            s.close()
        assert nodal.stop() == 0


def test_fifty_concurrent_associations_over_the_limit_are_refused_then_stored_on_retry(tmp_path):
    callers = [{"ae_title": f"CT{k:02d}", "host": "127.0.0.1"} for k in range(50)]
    nodal, port = start_node(tmp_path, callers, max_connections_per_host=64)
    studies = [f"1.2.826.0.1.19.10.{k}" for k in range(5)]
    paths = {uid: write_study(tmp_path / uid, uid, 40, pixels=256) for uid in studies}
    interleaved = [p for group in zip(*paths.values(), strict=True) for p in group]  # 200
    lists = [interleaved[k::50] for k in range(50)]  # 4 each, from all 5 studies
    for k in range(0, 50, 5):
        lists[k] += lists[k + 1]  # duplicates: sent by two callers at the same time
    try:
        pending = dict(enumerate(lists))
        refused_runs, rounds = 0, 0
        while pending and rounds < 10:
            rounds += 1
            procs = {
                k: subprocess.Popen(
                    [
                        "storescu",
                        "-aet",
                        f"CT{k:02d}",
                        "-aec",
                        "NODAL",
                        "127.0.0.1",
                        str(port),
                        *map(str, files),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    env=DCMTK_ENV,
                )
                for k, files in pending.items()
            }
            outs = {k: p.communicate(timeout=120)[0] for k, p in procs.items()}
            for k, p in procs.items():
                if p.returncode == 0:
                    pending.pop(k)
                else:
                    assert "Rejected Transient" in outs[k] and "Local Limit Exceeded" in outs[k], outs[k]
                    refused_runs += 1
            time.sleep(0.5)
        assert not pending, f"{len(pending)} senders still refused after {rounds} rounds"
        assert refused_runs >= 1  # the limit was reached
        for uid in studies:
            assert stored(nodal, uid) == 40  # one file per instance
            assert nodal.api(f"/api/studies/{uid}")["instances"] == 40  # one index row per instance
        sent = sum(len(f) for f in lists)
        print(
            f"\n50 concurrent associations: {sent} instances sent ({sent - 200} repeats), 200 stored once; "
            f"{refused_runs} association(s) rejected transient (2, 3, 2) and stored on retry, {rounds} rounds"
        )
    finally:
        assert nodal.stop() == 0
