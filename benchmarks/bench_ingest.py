"""Ingest benchmark: Orthanc pushes a 300-slice 512x512 CT study to nodal over DIMSE.

Measured in one run, against the same Orthanc and the same cached phantom. Each round
starts one receiver of each kind and then has Orthanc push the study to each in turn,
the order rotated from round to round, so that the receivers compared within a round are
measured seconds apart with the same programs running beside them (on this machine the
rate of the same receiver moves by a factor of two between minutes):
- `stock`: a pynetdicom SCP that returns success at once (pynetdicom defaults: 16 KiB
  PDU, Nagle on): the issue's "pynetdicom SCP that discards the data";
- `tuned`: the same with nodal's network settings (128 KiB PDU, TCP_NODELAY), so the
  ratio to it is the cost of durability alone;
- `floor`: the tuned SCP appending each dataset to one preallocated file with an
  fdatasync before it answers: the least a durable acknowledgement costs on this disk;
- `log` / `fsync`: `nodal serve` ingesting only (no workers), with each
  `spool.durability` (`log` is the embedded default).
Before each push every nodal has written its spool files and the page cache is synced,
so that no receiver's writes spill into another's turn.

Then `nodal serve` with the embedded defaults and one worker receives the study once
more, analyses it and sends SEG, SR and result images back to Orthanc.

Rates are instances per second between the first and the last instance received.
`ratio_vs_stock` is the default's median rate over the stock SCP's; each round's own
ratio and their median are reported too. `turnaround_s` is from the last instance
received to the results stored in Orthanc, less the quiet period (i.e. from study
completion). Needs the Debian peers (`make peers`).

    .venv/bin/python -m benchmarks.bench_ingest            # prints one JSON line
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import sqlite3
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.run import phantom_series  # noqa: E402
from dicom_node.config import SpoolSection  # noqa: E402
from dicom_node.observe.metrics import SPOOL_UNWRITTEN  # noqa: E402
from tests.helpers.peers import Nodal, Orthanc, free_port, model_dir, node_config, wait_until  # noqa: E402

DEFAULT = SpoolSection().durability  # what `nodal serve` uses unless configured
KINDS = ("stock", "tuned", "floor", "log", "fsync")
RESULT_MODALITIES = {"SEG", "SR", "OT"}


class DiscardingScp:
    """A pynetdicom SCP that stores nothing, or, with `sync_to`, that only appends each
    dataset to one preallocated file and fdatasyncs it: the least any receiver that
    acknowledges durably must do (no header, no index, no file per instance), i.e. the
    ceiling for a durable node on this disk."""

    def __init__(self, orthanc: Orthanc, name: str, tuned: bool, sync_to: Path | None = None):
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

        self.name, self.stamps = name, []
        self.fd, self.offset = -1, 0
        if sync_to is not None:
            self.fd = os.open(sync_to, os.O_RDWR | os.O_CREAT, 0o600)
            os.write(self.fd, bytes(400 << 20))  # written once, so a sync moves data only
            os.fsync(self.fd)

        def on_store(event) -> int:
            if self.fd >= 0:
                data = event.encoded_dataset(include_meta=False)
                os.pwrite(self.fd, data, self.offset)
                os.fdatasync(self.fd)
                self.offset += len(data)
            self.stamps.append(time.perf_counter())
            return 0x0000

        def on_open(event) -> None:
            if tuned:
                event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        ae = AE(ae_title="DISCARD")
        if tuned:
            ae.maximum_pdu_size = 131072
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        port = free_port()
        self.server = ae.start_server(
            ("127.0.0.1", port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, on_open)],
        )
        register(orthanc, name, "DISCARD", port)

    def rate(self) -> float:
        return (len(self.stamps) - 1) / (self.stamps[-1] - self.stamps[0])

    def settled(self) -> bool:
        return True

    def stop(self) -> None:
        self.server.shutdown()
        if self.fd >= 0:
            os.close(self.fd)


def register(orthanc: Orthanc, name: str, aet: str, port: int) -> None:
    requests.put(
        f"{orthanc.url}/modalities/{name}", json={"AET": aet, "Host": "127.0.0.1", "Port": port}, timeout=10
    ).raise_for_status()


def push(orthanc: Orthanc, study_id: str, modality: str) -> None:
    r = requests.post(
        f"{orthanc.url}/modalities/{modality}/store",
        json={"Resources": [study_id], "Synchronous": True},
        timeout=600,
    )
    r.raise_for_status()


def metric_values(http_port: int, prefix: str, label: str = "") -> dict[str, float]:
    text = requests.get(f"http://127.0.0.1:{http_port}/metrics", timeout=10).text
    return {
        line.split("{")[0].split()[0]: float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(prefix) and label in line
    }


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def results_in_orthanc(orthanc: Orthanc, study_id: str) -> bool:
    series = requests.get(f"{orthanc.url}/studies/{study_id}/series", timeout=10).json()
    return {s["MainDicomTags"].get("Modality") for s in series} >= RESULT_MODALITIES


class NodeUnderTest:
    """`nodal serve` in its own folder, registered in Orthanc as `name`: ingesting only,
    or (`analyse`) with the embedded defaults and one worker."""

    def __init__(
        self, orthanc: Orthanc, name: str, folder: Path, model: Path, durability: str, analyse: bool = False
    ):
        self.orthanc, self.name, self.folder, self.analyse = orthanc, name, folder, analyse
        port = free_port()
        cfg = node_config(
            folder / "var",
            port,
            model,
            allowed_callers=[{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}],
            destinations=[{"name": "pacs", "kind": "reply"}],
        )
        cfg["jobs"]["workers"] = 1 if analyse else 0
        cfg["spool"]["durability"] = durability
        cfg["spool"].pop("log_segment_mb", None)  # the embedded default, as `nodal serve` would
        cfg["inference"].pop("threads")  # all cores, as `nodal serve` would
        self.durability, self.http_port = durability, cfg["node"]["http_port"]
        register(orthanc, name, "NODAL", port)
        self.nodal = Nodal(folder, cfg).start(timeout=120, ready_path="/readyz" if analyse else "/healthz")
        wait_until(lambda: listening(port), 30, "nodal's DIMSE port")  # starts just after HTTP

    def push(self, study_id: str) -> None:
        try:
            push(self.orthanc, study_id, self.name)
        except requests.HTTPError as e:  # say why, from both sides, before the folders go
            orthanc_log = (self.orthanc.folder / "orthanc.log").read_text(errors="replace")
            raise RuntimeError(
                f"{e}\n--- nodal's log ends:\n{self.nodal.log()[-4000:]}"
                f"\n--- Orthanc's log ends:\n{orthanc_log[-4000:]}"
            ) from None

    def result(self, study_id: str) -> dict:
        """The ingest rate of the push (from the index), the mean time storing one instance
        inside nodal, and for an analysing node the time to its results in Orthanc."""
        db = self.folder / "var" / "index.sqlite3"
        sent = len(requests.get(f"{self.orthanc.url}/studies/{study_id}/instances", timeout=10).json())
        wait_until(  # the index follows the acknowledgements by up to a batch window
            lambda: sqlite3.connect(db).execute("SELECT count(*) FROM instances").fetchone()[0] >= sent,
            30,
            "every instance in the index",
        )
        first, last, n = (
            sqlite3.connect(db)
            .execute("SELECT min(received_at), max(received_at), count(*) FROM instances")
            .fetchone()
        )
        store = metric_values(self.http_port, "nodal_store_duration_seconds_", 'receiver="dimse"')
        count = store.get("nodal_store_duration_seconds_count", 0.0)
        out = {
            "instances": n,
            "rate_per_s": round((n - 1) / (last - first), 1),
            "durability": self.durability,
            "store_ms_mean": round(store["nodal_store_duration_seconds_sum"] / count * 1000, 2)
            if count
            else 0.0,
        }
        if self.analyse:
            wait_until(
                lambda: results_in_orthanc(self.orthanc, study_id), 900, "results in Orthanc", every=0.2
            )
            stored = time.time()
            completed, job_seconds = (
                sqlite3.connect(db)
                .execute(
                    "SELECT s.completed_at, j.seconds FROM studies s JOIN jobs j ON j.study_uid = s.study_uid"
                )
                .fetchone()
            )
            out |= {
                "turnaround_s": round(stored - completed, 1),
                "last_instance_to_results_s": round(stored - last, 1),
                "quiet_period_s": round(completed - last, 1),
                "stage_seconds": json.loads(job_seconds or "{}"),
            }
        return out

    def settled(self) -> bool:
        """Every acknowledged instance's spool file written (the log is empty of them)."""
        return not metric_values(self.http_port, SPOOL_UNWRITTEN).get(SPOOL_UNWRITTEN, 0.0)

    def stop(self) -> None:
        self.nodal.stop()


def quiesce(receivers) -> None:
    """Wait until no receiver has writes pending, then until the disk holds them all."""
    wait_until(lambda: all(r.settled() for r in receivers), 120, "the spool files written", every=0.1)
    os.sync()


def one_round(orthanc: Orthanc, study_id: str, folder: Path, model: Path, order: list[str]) -> dict:
    """Start one receiver of each kind, push the study to each in `order`; their results."""
    folder.mkdir(parents=True)
    receivers: dict = {}
    try:
        receivers["stock"] = DiscardingScp(orthanc, "stock", tuned=False)
        receivers["tuned"] = DiscardingScp(orthanc, "tuned", tuned=True)
        receivers["floor"] = DiscardingScp(orthanc, "floor", tuned=True, sync_to=folder / "floor.bin")
        for durability in ("log", "fsync"):
            receivers[durability] = NodeUnderTest(orthanc, durability, folder / durability, model, durability)
        out = {}
        for kind in order:
            quiesce(receivers.values())
            receiver = receivers[kind]
            if isinstance(receiver, NodeUnderTest):
                receiver.push(study_id)
                out[kind] = receiver.result(study_id)
            else:
                push(orthanc, study_id, kind)
                out[kind] = {"rate_per_s": round(receiver.rate(), 1)}
        return out
    finally:
        for receiver in receivers.values():
            receiver.stop()
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=3_000_300)
    p.add_argument(
        "--nodal-dir",
        type=Path,
        default=None,
        help="parent folder for nodal's data (default: the temporary folder); /dev/shm shows the "
        "software cost alone, since fsync on tmpfs does not reach a disk (not durable)",
    )
    p.add_argument(
        "--rounds", type=int, default=5, help="rounds of one push to each receiver (medians reported)"
    )
    p.add_argument(
        "--no-analysis", action="store_true", help="leave out the analysed run (ingest rates only)"
    )
    args = p.parse_args()
    model = model_dir()
    if model is None:
        raise SystemExit("no model: train one (make train) or set NODAL_TEST_MODEL_DIR")
    series = phantom_series(300, args.seed)
    with (
        tempfile.TemporaryDirectory(prefix="nodal-bench-ingest-") as tmp,
        tempfile.TemporaryDirectory(prefix="nodal-bench-data-", dir=args.nodal_dir) as nodal_tmp,
    ):
        root, nodal_root = Path(tmp), Path(nodal_tmp)
        orthanc = Orthanc(root / "orthanc").start()
        try:
            client = orthanc.client()
            for f in sorted(series.glob("*.dcm")):
                client.upload_file(f)
            [study_id] = requests.get(f"{orthanc.url}/studies", timeout=10).json()
            rates: dict[str, list[float]] = {k: [] for k in KINDS}
            store_ms: dict[str, list[float]] = {"log": [], "fsync": []}  # inside nodal, per instance
            for r in range(args.rounds):
                order = list(KINDS[r % len(KINDS) :] + KINDS[: r % len(KINDS)])
                results = one_round(orthanc, study_id, nodal_root / f"round-{r}", model, order)
                for kind in KINDS:
                    rates[kind].append(results[kind]["rate_per_s"])
                for durability in store_ms:
                    store_ms[durability].append(results[durability]["store_ms_mean"])
            node = {}
            if not args.no_analysis:
                os.sync()
                analysed = NodeUnderTest(orthanc, "nodal", nodal_root / "nodal", model, DEFAULT, analyse=True)
                try:
                    analysed.push(study_id)
                    node = analysed.result(study_id)
                finally:
                    analysed.stop()
        finally:
            orthanc.stop()
    med = {k: statistics.median(v) for k, v in rates.items()}
    per_round = [round(a / b, 2) for a, b in zip(rates[DEFAULT], rates["stock"], strict=True)]
    print(
        json.dumps(
            {
                "benchmark": "ingest-300x512x512",
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "date": str(date.today()),
                "model": str(model.name),
                "nodal_data_on": str(args.nodal_dir or tempfile.gettempdir()),
                "rounds": args.rounds,
                "rates_per_s": {k: [round(x, 1) for x in v] for k, v in rates.items()},
                "median_per_s": {k: round(v, 1) for k, v in med.items()},
                "nodal": node,
                "store_ms_mean": store_ms,
                "default_durability": DEFAULT,
                "ratio_vs_stock": round(med[DEFAULT] / med["stock"], 2),
                "ratio_vs_stock_per_round": per_round,
                "ratio_vs_stock_median_of_rounds": round(statistics.median(per_round), 2),
                "ratio_vs_tuned": round(med[DEFAULT] / med["tuned"], 2),
                "ratio_floor_vs_stock_per_round": [
                    round(a / b, 2) for a, b in zip(rates["floor"], rates["stock"], strict=True)
                ],
                "ratio_log_vs_stock": round(med["log"] / med["stock"], 2),
                "ratio_fsync_vs_stock": round(med["fsync"] / med["stock"], 2),
                "ratio_floor_vs_stock": round(med["floor"] / med["stock"], 2),
                "ratio_vs_floor": round(med[DEFAULT] / med["floor"], 2),
                "ratio_log_vs_fsync": round(med["log"] / med["fsync"], 2),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
