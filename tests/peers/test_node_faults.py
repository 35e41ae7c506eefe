"""Faults and load against a running `nodal serve` (subprocess), with dcmtk (storescu) as
the sender:

1. Load: 8 simultaneous associations from 8 AE titles carry 4 interleaved studies, each study
   split over all 8 associations, two of them sent a second time at once: every instance
   is stored once and every study is processed once (one job, done, one attempt).
2. `kill -9` during ingest: every instance acknowledged with success is in the spool and the
   index after the restart; the sender re-sends the batch and each instance is stored once.
3. `kill -9` during sending (a PACS that takes 1.5 s per instance): after the restart every
   result is delivered and the PACS holds exactly one copy of each.

The figures each run prints are those recorded in docs/reliability.md.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pydicom
import pytest

from inference import phantoms
from tests.helpers import peers
from tests.helpers.dicom import part10
from tests.helpers.peers import Nodal, Orthanc, free_port, study_series, wait_until

pytestmark = [pytest.mark.peers, pytest.mark.slow]

if peers.missing_binaries("storescu") or peers.model_dir() is None:
    pytest.skip("needs dcmtk (`make peers`) and the shipped model", allow_module_level=True)

SMALL = phantoms.PhantomSpec(
    rows=64, columns=64, pixel_spacing_mm=1.5, slices=24, slice_spacing_mm=2.5, nodes=(0, 1)
)
CALLERS = [f"CT{k}" for k in range(1, 9)]


def spool_files(nodal: Nodal) -> list[Path]:
    root = Path(nodal.config["node"]["data_dir"]) / "spool"
    return [p for p in root.rglob("*.dcm") if ".tmp" not in p.parts]


def test_eight_associations_four_interleaved_studies_stored_and_processed_once(tmp_path):
    port = free_port()
    cfg = peers.node_config(
        tmp_path / "var",
        port,
        peers.model_dir(),
        allowed_callers=[{"ae_title": ae, "host": "127.0.0.1"} for ae in CALLERS],
    )
    cfg["completion"] = {"quiet_seconds": 4.0, "after_release_seconds": 2.0, "check_interval_seconds": 0.5}
    studies = []
    for i in range(4):
        paths = phantoms.write_phantom(phantoms.generate(6_100_000 + i, SMALL), tmp_path / f"s{i}")
        paths = sorted(p for p in paths if p.suffix == ".dcm")
        uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        studies.append((uid, paths))
    interleaved = [p for group in zip(*(paths for _, paths in studies), strict=True) for p in group]
    lists = [interleaved[k::8] for k in range(8)]
    lists[0] += studies[0][1]  # the same study sent again, at the same time, by two callers
    lists[1] += studies[1][1]
    nodal = Nodal(tmp_path, cfg).start()
    try:
        procs = [
            subprocess.Popen(
                ["storescu", "-aet", ae, "-aec", "NODAL", "127.0.0.1", str(port), *map(str, files)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for ae, files in zip(CALLERS, lists, strict=True)
        ]
        outs = [p.communicate(timeout=120)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        sent = sum(len(f) for f in lists)
        expected = len(interleaved)

        def all_done():
            jobs = [nodal.api(f"/api/jobs?study={uid}")["jobs"] for uid, _ in studies]
            return jobs if all(j and all(x["state"] in ("done", "failed") for x in j) for j in jobs) else None

        jobs = wait_until(all_done, 400, "a finished job for each of the 4 studies", every=2)
        for (uid, paths), study_jobs in zip(studies, jobs, strict=True):
            assert nodal.api(f"/api/studies/{uid}")["instances"] == len(paths)
            [job] = study_jobs  # processed once: one job, no superseded duplicate
            assert job["state"] == "done" and job["attempts"] == 1 and job["instances"] == len(paths)
        files = spool_files(nodal)
        assert len(files) == expected and len({f.name for f in files}) == expected
        print(
            f"\nload: 8 associations, {sent} instances sent ({sent - expected} repeats), "
            f"{expected} stored, {len(files)} files in the spool, 4 studies -> 4 jobs done"
        )
    finally:
        assert nodal.stop() == 0


def _send(port: int, batch: dict[Path, str], acked: list[str], stop: threading.Event) -> None:
    """dcmtk's storescu, the modality, C-STOREs each file of `batch` (file -> SOP Instance UID)
    over one association; record the UIDs answered with Success, as storescu reports them.

    (Not pynetdicom's SCU: on a loaded machine its association reactor can take a C-STORE
    response off the queue in the instant before `send_c_store` has paused it, log "Received
    unexpected C-STORE service message", and leave the sender waiting for the DIMSE timeout.)"""
    cmd = ["storescu", "-v", "-aet", "CT1", "-aec", "NODAL", "127.0.0.1", str(port), *map(str, batch)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sending = None
    try:
        for line in proc.stderr or ():  # storescu -v logs each file and each response in order
            if stop.is_set():
                break
            if line.startswith("I: Sending file: "):
                sending = batch[Path(line.removeprefix("I: Sending file: ").strip())]
            elif line.startswith("I: Received Store Response (Success)") and sending:
                acked.append(sending)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_kill_9_during_ingest_loses_no_acknowledged_instance(tmp_path):
    port = free_port()
    cfg = peers.node_config(tmp_path / "var", port, peers.model_dir(), allowed_callers=[{"ae_title": "CT1"}])
    cfg["jobs"]["workers"] = 0  # receive only: this test is about the spool
    pixels = bytes(range(256)) * 256  # 64 KiB of pixel data per instance
    (tmp_path / "batch").mkdir()
    items: dict[Path, str] = {}
    for i in range(1, 401):
        path = tmp_path / "batch" / f"{i:03d}.dcm"
        path.write_bytes(
            part10(sop=f"1.2.3.4.{i}", Rows=128, Columns=256, BitsAllocated=16, PixelData=pixels)
        )
        items[path] = f"1.2.3.4.{i}"
    nodal = Nodal(tmp_path, cfg).start(ready_path="/healthz")
    acked: list[str] = []
    stop = threading.Event()
    sender = threading.Thread(target=_send, args=(port, items, acked, stop))
    try:
        sender.start()
        wait_until(lambda: len(acked) >= 100, 120, "100 acknowledged instances", every=0.05)
        nodal.kill()  # SIGKILL mid-association, instances in flight
        stop.set()
        sender.join(30)
        first = list(acked)
        assert 100 <= len(first) < len(items), "the kill should land mid-transfer"
        nodal = Nodal(tmp_path, cfg).start(ready_path="/healthz")
        on_disk = {f.stem for f in spool_files(nodal)}
        lost = set(first) - on_disk
        assert not lost, f"{len(lost)} acknowledged instance(s) lost"
        indexed = nodal.api("/api/studies/1.2.3")["instances"]
        assert indexed == len(on_disk)  # reconcile indexed what the dead process had not
        again: list[str] = []
        _send(port, items, again, threading.Event())  # the sender repeats the whole batch
        assert len(again) == len(items)
        assert nodal.api("/api/studies/1.2.3")["instances"] == len(items)  # the API waits for the files too
        files = spool_files(nodal)
        assert len(files) == len(items) and len({f.name for f in files}) == len(items)
        print(
            f"\nkill -9 during ingest: {len(first)} acknowledged before the kill, {len(on_disk)} in the "
            f"spool after restart (0 lost), {len(items)} re-sent, {len(files)} stored once each"
        )
    finally:
        stop.set()
        nodal.stop()


class SlowOrthanc(Orthanc):
    """Orthanc that takes `delay` seconds over each instance received by DICOM (a Lua filter),
    so that a test can kill the sender in the middle of a delivery."""

    def __init__(self, folder: Path, delay: float = 1.5):
        super().__init__(folder, aet="SLOWPACS")
        self.delay = delay

    def config(self) -> dict:
        lua = self.folder / "slow.lua"
        lua.write_text(
            "function ReceivedInstanceFilter(dicom, origin, info)\n"
            f"  if origin['RequestOrigin'] == 'DicomProtocol' then os.execute('sleep {self.delay}') end\n"
            "  return true\nend\n"
        )
        return {**super().config(), "LuaScripts": [str(lua)]}


@pytest.mark.skipif(peers.orthanc_binary() is None, reason="needs Orthanc (`make peers`)")
def test_kill_9_during_sending_leaves_one_copy_of_each_result(tmp_path):
    pacs = SlowOrthanc(tmp_path / "pacs").start()
    port = free_port()
    dest = {
        "name": "pacs",
        "kind": "dimse",
        "ae_title": "SLOWPACS",
        "host": "127.0.0.1",
        "port": pacs.dicom_port,
    }
    cfg = peers.node_config(
        tmp_path / "var", port, peers.model_dir(), allowed_callers=[{"ae_title": "CT1"}], destinations=[dest]
    )
    paths = phantoms.write_phantom(phantoms.generate(6_200_000, SMALL), tmp_path / "ct")
    paths = sorted(p for p in paths if p.suffix == ".dcm")
    study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    nodal = Nodal(tmp_path, cfg).start()
    try:
        sent = subprocess.run(
            ["storescu", "-aet", "CT1", "-aec", "NODAL", "127.0.0.1", str(port), *map(str, paths)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_until(lambda: study_series(pacs, study_uid), 300, "the first result in the PACS", every=0.2)
        nodal.kill()  # the delivery association is open: the next instance is in the slow filter
        arrived_before = sum(len(s["instances"]) for s in study_series(pacs, study_uid))
        nodal = Nodal(tmp_path, cfg).start()
        [job] = nodal.api(f"/api/jobs?study={study_uid}")["jobs"]
        detail = wait_until(
            lambda: (d := nodal.api(f"/api/jobs/{job['id']}"))["deliveries"]["pacs"]["pending"] == 0 and d,
            120,
            "every result delivered after the restart",
        )
        results = detail["deliveries"]["pacs"]
        n = len(results["instances"])
        assert results["delivered"] == n and results["failed"] == 0 and n >= 2
        assert arrived_before < n, "the kill should land mid-delivery"
        series = study_series(pacs, study_uid)
        by_modality = {}
        for s in series:
            by_modality.setdefault(s["modality"], []).append(len(s["instances"]))
        assert all(len(v) == 1 for v in by_modality.values()), by_modality  # no second result series
        in_pacs = sum(sum(v) for v in by_modality.values())
        assert in_pacs == n, (in_pacs, n)
        uids = {i["sop_instance_uid"] for i in results["instances"]}
        assert len(uids) == n
        print(
            f"\nkill -9 during sending: {n} result instances, {arrived_before} in the PACS at the kill, "
            f"{in_pacs} in the PACS after the restart (one copy each), attempts "
            f"{sorted(i['attempts'] for i in results['instances'])}"
        )
    finally:
        nodal.stop()
        pacs.stop()
