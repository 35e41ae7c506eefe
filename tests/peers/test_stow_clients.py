"""STOW-RS as real clients speak it (issue 20): each client sends a 60-instance study to
nodal's HTTP server (uvicorn, in this process, on a free 127.0.0.1 port); every instance
must be stored and the Store Instances Response must list each one.

- Orthanc's DICOMweb plugin (`POST /dicom-web/servers/nodal/stow`): chunked, 73-character
  boundary (what nodal refused before issue 20);
- `dicomweb-client` from PyPI (what nodal's own `dicomweb` destinations use);
- `dicomweb-client` from npm (the library OHIF stores with), run by Node with `xhr2` as its
  XMLHttpRequest; installed with npm into `var/npm` (not in git) when missing;
- curl with a hand-built body: unquoted `type`, quoted 73-character boundary, parts with
  Content-Length, `Transfer-Encoding: chunked`, the study-level URL.

And the other direction: nodal's `dicomweb` sender against Orthanc's DICOMweb receiver and
against nodal's own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from dicom_node.api.app import create_app
from dicom_node.config import Settings
from dicom_node.delivery.senders import DicomwebSender, Outgoing
from dicom_node.index.db import Database, Instance
from dicom_node.receive.receiver import Receiver
from dicom_node.serve import _http_server
from dicom_node.spool.store import Spool
from tests.helpers.peers import ROOT, Orthanc, dicomweb_plugin, free_port, orthanc_binary, wait_until

N = 60
CT = "1.2.840.10008.5.1.4.1.1.2"
NPM_DIR = ROOT / "var" / "npm"  # npm's install folder and cache (ignored by git)
NPM_PACKAGES = ("dicomweb-client@0.11.3", "xhr2@0.2.1")
NPM_INSTALL = ("npm", "install", "--no-audit", "--no-fund", "--no-save")


def ct_study(folder: Path, n: int = N) -> tuple[str, list[Path]]:
    """A study of `n` CT images (128x128, 32 KB: a body of several 64 KiB chunks) as Part 10 files."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for k in range(n):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = CT, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.PatientName, ds.Modality = "STOW-CLIENTS", "Interop^Test", "CT"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20261205", "120000", "", "1"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [0, 0, float(k)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [1, 1], 1
        ds.Rows = ds.Columns = 128
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = (np.arange(128 * 128, dtype=np.int16) + k).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CT, ds.SOPInstanceUID
        path = folder / f"{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return study, paths


def sop_uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


@dataclass
class Exchange:
    """One STOW-RS request as nodal saw it and what nodal answered."""

    path: str
    request_headers: dict[str, str]
    status: int = 0
    response_headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class Recorder:
    """ASGI middleware that keeps every /dicom-web exchange (the test's view of the wire)."""

    def __init__(self, app):
        self.app = app
        self.exchanges: list[Exchange] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/dicom-web"):
            await self.app(scope, receive, send)
            return
        ex = Exchange(scope["path"], {k.decode().lower(): v.decode() for k, v in scope["headers"]})
        self.exchanges.append(ex)

        async def recording_send(message):
            if message["type"] == "http.response.start":
                ex.status = message["status"]
                ex.response_headers = {k.decode().lower(): v.decode() for k, v in message["headers"]}
            elif message["type"] == "http.response.body":
                ex.body += message.get("body", b"")
            await send(message)

        await self.app(scope, receive, recording_send)


@dataclass
class Node:
    url: str  # http://127.0.0.1:PORT
    receiver: Receiver
    db: Database
    recorder: Recorder

    def stored(self) -> set[str]:
        self.receiver.flush(timeout=10)
        with self.db.session() as s:
            return set(s.scalars(select(Instance.sop_uid)))

    def check(self, sent: set[str]) -> None:
        """Every instance stored, each request answered 200 with every instance it carried."""
        assert self.stored() == sent
        assert self.recorder.exchanges, "no STOW-RS request reached nodal"
        referenced = set()
        for ex in self.recorder.exchanges:
            assert ex.status == 200, (ex.status, ex.body[:300])
            assert ex.response_headers["content-type"] == "application/dicom+json"
            answer = json.loads(ex.body)
            assert "00081198" not in answer  # no FailedSOPSequence
            for item in answer["00081199"]["Value"]:
                assert item["00081150"]["Value"] == [CT]
                referenced.add(item["00081155"]["Value"][0])
        assert referenced == sent


@pytest.fixture
def node(tmp_path) -> Iterator[Node]:
    db = Database(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    spool = Spool(tmp_path / "spool")
    receiver = Receiver(spool, db)
    settings = Settings()
    recorder = Recorder(create_app(settings, db, receiver, lambda: True))
    port = free_port()
    # uvicorn as `nodal serve` configures it
    server = _http_server(recorder, "127.0.0.1", port, settings.node.http_limits.header_timeout_seconds)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 10, "uvicorn")
    yield Node(f"http://127.0.0.1:{port}", receiver, db, recorder)
    server.should_exit = True
    thread.join(10)
    receiver.close()
    spool.close()
    db.close()


def need_orthanc() -> None:
    if orthanc_binary() is None or dicomweb_plugin() is None:
        pytest.skip("Orthanc or its DICOMweb plugin is missing (`make peers` installs them)")


class OrthancWithNodal(Orthanc):
    """Orthanc with nodal registered as a DICOMweb server named `nodal`."""

    def __init__(self, folder: Path, nodal_url: str):
        super().__init__(folder)
        self.nodal_url = nodal_url

    def config(self) -> dict:
        cfg = super().config()
        cfg["DicomWeb"]["Servers"] = {"nodal": [f"{self.nodal_url}/dicom-web/"]}
        return cfg


@pytest.mark.peers
def test_orthanc_dicomweb_plugin_stows_a_study_to_nodal(tmp_path, node):
    need_orthanc()
    _, paths = ct_study(tmp_path / "study")
    orthanc = OrthancWithNodal(tmp_path / "orthanc", node.url).start()
    try:
        for p in paths:
            requests.post(f"{orthanc.url}/instances", data=p.read_bytes(), timeout=30).raise_for_status()
        (orthanc_study,) = requests.get(f"{orthanc.url}/studies", timeout=10).json()
        r = requests.post(
            f"{orthanc.url}/dicom-web/servers/nodal/stow", json={"Resources": [orthanc_study]}, timeout=120
        )
        assert r.status_code == 200, f"Orthanc: {r.status_code} {r.text[:500]}"
    finally:
        orthanc.stop()
    node.check(sop_uids(paths))
    # what made Orthanc fail before: its boundary is 73 characters, its body chunked
    first = node.recorder.exchanges[0].request_headers
    assert first.get("transfer-encoding") == "chunked" and "content-length" not in first
    boundary = first["content-type"].split("boundary=")[1].split(";")[0].strip('"')
    assert len(boundary) == 73, first["content-type"]
    assert first["accept"] == "application/dicom+json"


def test_dicomweb_client_python_stores_a_study(tmp_path, node):
    from dicomweb_client.api import DICOMwebClient

    study, paths = ct_study(tmp_path / "study")
    client = DICOMwebClient(f"{node.url}/dicom-web")
    half = N // 2
    answers = [
        client.store_instances([pydicom.dcmread(p) for p in paths[:half]]),
        client.store_instances([pydicom.dcmread(p) for p in paths[half:]], study_instance_uid=study),
    ]
    node.check(sop_uids(paths))
    assert [len(a.ReferencedSOPSequence) for a in answers] == [half, N - half]
    assert "FailedSOPSequence" not in answers[0] and "FailedSOPSequence" not in answers[1]
    assert node.recorder.exchanges[1].path == f"/dicom-web/studies/{study}"


def npm_client() -> Path:
    """The npm packages in var/npm (installed there when missing); the folder to run node in."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed")
    if not (NPM_DIR / "node_modules" / "dicomweb-client" / "package.json").is_file():
        NPM_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [*NPM_INSTALL, "--prefix", str(NPM_DIR), "--cache", str(NPM_DIR / ".cache"), *NPM_PACKAGES],
            check=True,
            capture_output=True,
            timeout=300,
        )
    return NPM_DIR


JS_STORE = """
global.XMLHttpRequest = require('xhr2');
const { api } = require('dicomweb-client');
const fs = require('fs');
const [url, study, ...files] = process.argv.slice(2);
const datasets = files.map((f) => {
  const b = fs.readFileSync(f);
  return b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength);
});
const client = new api.DICOMwebClient({ url });
const options = study ? { datasets, studyInstanceUID: study } : { datasets };
client.storeInstances(options).then(
  (answer) => { console.log(typeof answer === 'string' ? answer : JSON.stringify(answer)); },
  (error) => {
    console.error('storeInstances failed:', error && (error.status || error.message || error));
    process.exit(1);
  },
);
"""


def test_dicomweb_client_javascript_stores_a_study(tmp_path, node):
    folder = npm_client()
    study, paths = ct_study(tmp_path / "study")
    script = tmp_path / "store.js"
    script.write_text(JS_STORE)
    half = N // 2
    for study_arg, batch in (("", paths[:half]), (study, paths[half:])):
        run = subprocess.run(
            ["node", str(script), f"{node.url}/dicom-web", study_arg, *map(str, batch)],
            cwd=folder,
            env={**os.environ, "NODE_PATH": str(folder / "node_modules")},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        assert len(json.loads(run.stdout)["00081199"]["Value"]) == len(batch)
    node.check(sop_uids(paths))
    assert node.recorder.exchanges[1].path == f"/dicom-web/studies/{study}"


def test_curl_with_a_hand_built_body(tmp_path, node):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    study, paths = ct_study(tmp_path / "study")
    boundary = "0d7a4b0e-5c5e-4f7e-9c7e-2f0b1c9d8e7f-6a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
    body = bytearray(b"a preamble to ignore\r\n")
    for p in paths:
        data = p.read_bytes()
        body += (
            f"--{boundary}\r\nContent-Type: application/dicom\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        )
        body += data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    (tmp_path / "body").write_bytes(body)
    run = subprocess.run(
        [
            *("curl", "-sS", "--fail-with-body", "-X", "POST", "--data-binary", f"@{tmp_path / 'body'}"),
            *("-H", f'Content-Type: multipart/related; type=application/dicom; boundary="{boundary}"'),
            *("-H", "Transfer-Encoding: chunked", "-H", "Accept: application/dicom+json"),
            f"{node.url}/dicom-web/studies/{study}",
        ],
        capture_output=True,
        timeout=120,
    )
    assert run.returncode == 0, (run.returncode, run.stdout[-500:], run.stderr[-500:])
    node.check(sop_uids(paths))
    assert node.recorder.exchanges[0].request_headers["transfer-encoding"] == "chunked"


# --- the other direction: nodal's dicomweb sender (kind: dicomweb) against receivers ---


def outgoing(paths: list[Path]) -> list[Outgoing]:
    out = []
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        out.append(Outgoing(str(ds.SOPInstanceUID), str(ds.SOPClassUID), p))
    return out


@pytest.mark.peers
def test_dicomweb_sender_to_orthanc(tmp_path):
    need_orthanc()
    _, paths = ct_study(tmp_path / "study")
    orthanc = Orthanc(tmp_path / "orthanc").start()
    try:
        result = DicomwebSender(f"{orthanc.url}/dicom-web").send(outgoing(paths))
        assert result == dict.fromkeys(sop_uids(paths))
        stored = requests.get(f"{orthanc.url}/instances", timeout=10).json()
        assert len(stored) == N
    finally:
        orthanc.stop()


def test_dicomweb_sender_to_nodal(tmp_path, node):
    _, paths = ct_study(tmp_path / "study")
    result = DicomwebSender(f"{node.url}/dicom-web").send(outgoing(paths))
    assert result == dict.fromkeys(sop_uids(paths))
    node.check(sop_uids(paths))
