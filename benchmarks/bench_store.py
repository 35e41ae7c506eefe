"""Store benchmark: the receiving path of one instance, in process, without the network.

`Receiver.store_dataset` (what the C-STORE handler calls: read the header from the
dataset, put a file meta prefix in front, write it durably, queue its index row) on the
300 instances (525 KB each) of the ingest benchmark's phantom, one after the other as one
synchronous association delivers them, with the indexer thread running beside it. Then
the same steps without the indexer, each timed, to show where the time goes (with `log`,
`write_rename` is the placer thread's step, copying the record out of the log once the
receivers pause: it is outside `ms_per_instance`). `read_part10_header` is what reading
the same header from the Part 10 bytes costs (STOW-RS, recovery), for comparison.

    .venv/bin/python -m benchmarks.bench_store [--durability log|fsync|syncfs]   # one JSON line
"""

from __future__ import annotations

import argparse
import json
import struct
import tempfile
import time
from datetime import date
from pathlib import Path

from benchmarks.run import phantom_series
from dicom_node.index.db import Database
from dicom_node.receive.contract import Source
from dicom_node.receive.receiver import Receiver
from dicom_node.spool.header import read_dataset_header, read_header
from dicom_node.spool.part10 import file_meta_prefix
from dicom_node.spool.store import Spool, relative_path


def as_received(part10: bytes) -> tuple[bytes, str]:
    """(dataset, transfer syntax UID) of a Part 10 file: what a C-STORE request carries."""
    end = 144 + struct.unpack("<I", part10[140:144])[0]  # after the group length's value
    return part10[end:], read_header(part10).transfer_syntax_uid


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--durability", choices=("fsync", "log", "syncfs"), default="fsync")
    p.add_argument("--seed", type=int, default=3_000_300)
    args = p.parse_args()
    files = [f.read_bytes() for f in sorted(phantom_series(300, args.seed).glob("*.dcm"))]
    received = [as_received(f) for f in files]
    source = Source(via="dimse", transfer_id="bench", calling_ae="BENCH", peer_host="127.0.0.1")
    with tempfile.TemporaryDirectory(prefix="nodal-bench-store-") as tmp:
        root = Path(tmp)
        receiver = Receiver(Spool(root / "spool", args.durability), Database(f"sqlite:///{root / 'i.db'}"))
        receiver.transfers.begin("bench")
        t = time.perf_counter()
        for dataset, ts in received:
            assert receiver.store_dataset(dataset, ts, source).status == 0
        per_instance = (time.perf_counter() - t) / len(files)
        receiver.flush()
        receiver.close()

        spool = Spool(root / "steps", args.durability)
        names = ("read_header", "meta_prefix")
        names += ("log_append_fdatasync", "write_rename") if spool.log is not None else ("write", "commit")
        steps = dict.fromkeys(("read_part10_header", *names), 0.0)
        for part10, (dataset, ts) in zip(files, received, strict=True):
            t0 = time.perf_counter()
            read_header(part10)
            t1 = time.perf_counter()
            header = read_dataset_header(dataset, ts, "BENCH")
            rel = relative_path(header)
            t2 = time.perf_counter()
            data = (file_meta_prefix(header.sop_class_uid, header.sop_instance_uid, ts, "BENCH"), dataset)
            t3 = time.perf_counter()
            if spool.log is not None:
                seq = spool.log.append(str(rel), data)
                t4 = time.perf_counter()
                spool._place(seq, rel)
                spool.log.done(seq)
            else:
                temp = spool.write_temp(data, synced=args.durability == "fsync")
                t4 = time.perf_counter()
                spool.commit(temp, rel, synced=True)
            t5 = time.perf_counter()
            for k, d in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
                steps[k] += d
        spool.close()
    print(
        json.dumps(
            {
                "benchmark": "store-300x512x512",
                "date": str(date.today()),
                "durability": args.durability,
                "ms_per_instance": round(per_instance * 1000, 2),
                "steps_ms": {k: round(v / len(files) * 1000, 3) for k, v in steps.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
