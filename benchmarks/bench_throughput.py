"""Throughput benchmark: studies per hour with 1 and 2 Celery workers on one machine.

For each worker count: a fresh redis-server, `nodal serve` (queue.backend celery, SQLite
index), that many `nodal worker` processes (one torch thread each, so each worker is one
CPU core), then `--studies` small phantom CT studies sent at once by storescu. The rate is
the number of studies over the time from the first job started to the last job finished,
read from the index. The ratio of the two rates is how the queue scales on this machine.

    .venv/bin/python -m benchmarks.bench_throughput [--studies 6]   # prints one JSON line

Needs redis-server and storescu (`make peers`) and the shipped model.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from inference import phantoms  # noqa: E402
from tests.helpers.peers import (  # noqa: E402
    Nodal,
    NodalWorker,
    Redis,
    free_port,
    model_dir,
    node_config,
    storescu,
    wait_until,
)

# the study size of tests/peers/test_scaleout.py: 24 slices of 128x128, about 3 mm voxels
SPEC = phantoms.PhantomSpec(rows=128, columns=128, pixel_spacing_mm=2.9, slices=24, slice_spacing_mm=4.0)


def studies_per_hour(workers: int, series: list[list[Path]], root: Path) -> dict:
    redis = Redis(root / "redis").start()
    port = free_port()
    cfg = node_config(root / "data", port, model_dir(), queue={"backend": "celery", "broker_url": redis.url})
    cfg["inference"]["threads"] = 1
    nodal = Nodal(root / "serve", cfg)
    procs: list[NodalWorker] = []
    try:
        nodal.start()
        procs = [NodalWorker(root / "serve", nodal.folder / "node.yaml", f"w{i}") for i in range(workers)]
        wait_until(lambda: all(w.ready() for w in procs), 180, "the workers to load the model")
        for paths in series:
            storescu(paths, port)
        db = root / "data" / "index.sqlite3"

        def finished():
            with sqlite3.connect(db) as c:
                rows = c.execute("SELECT state, started_at, finished_at, worker FROM jobs").fetchall()
            return rows if len(rows) == len(series) and all(r[0] == "done" for r in rows) else None

        rows = wait_until(finished, 60 * 30, "every job done", every=1.0)
    finally:
        for w in procs:
            w.stop()
        nodal.stop()
        redis.stop()
    window = max(r[2] for r in rows) - min(r[1] for r in rows)
    per_job = sorted(r[2] - r[1] for r in rows)
    return {
        "workers": workers,
        "studies": len(rows),
        "window_s": round(window, 1),
        "studies_per_hour": round(len(rows) * 3600 / window, 1),
        "median_job_s": round(per_job[len(per_job) // 2], 1),
        "jobs_per_worker": sorted({r[3]: sum(x[3] == r[3] for x in rows) for r in rows}.values()),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--studies", type=int, default=6)
    args = p.parse_args()
    if model_dir() is None:
        raise SystemExit("no model: inference/models/nodal-ln-demo is missing")
    with tempfile.TemporaryDirectory(prefix="nodal-bench-") as tmp:
        root = Path(tmp)
        series = [
            phantoms.write_phantom(phantoms.generate(200 + i, SPEC), root / f"ct-{i}")
            for i in range(args.studies)
        ]
        t = time.time()
        runs = [studies_per_hour(n, series, root / f"run-{n}") for n in (1, 2)]
    out = {
        "runs": runs,
        "ratio_2_to_1": round(runs[1]["studies_per_hour"] / runs[0]["studies_per_hour"], 2),
        "spec": f"{SPEC.slices}x{SPEC.rows}x{SPEC.columns}",
        "seconds": round(time.time() - t),
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
