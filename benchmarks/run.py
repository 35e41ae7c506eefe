"""All benchmarks, one command: `make bench` (= `.venv/bin/python -m benchmarks.run`).

1. CPU pipeline on a 300-slice 512x512 phantom CT (time per stage, peak RSS);
2. with `--large`: the same on a 1000-slice series (must not run out of memory);
3. the result-object encoder (SEG + SR, result images) on one core;
4. the receiving path of one instance in process (`bench_store`), the STOW-RS body parser
   (`bench_stow`), and DICOM ingest from
   Orthanc against a discarding SCP (`bench_ingest`; needs Orthanc, `--no-ingest` leaves it out);
5. studies per hour with 1 and 2 Celery workers (`bench_throughput`; needs redis-server
   and storescu, `make peers`; `--no-throughput` leaves it out).

Phantom series are cached under var/bench/. Prints one JSON line per benchmark; the
figures in benchmarks/RESULTS.md come from this command.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "var" / "bench"


def phantom_series(slices: int, seed: int) -> Path:
    from inference import phantoms

    out = CACHE / f"phantom-{slices}x512-{seed}"
    if not (out / "ground_truth.json").is_file():
        spec = phantoms.PhantomSpec(
            rows=512, columns=512, pixel_spacing_mm=0.78, slices=slices, slice_spacing_mm=1.25
        )
        phantoms.write_phantom(phantoms.generate(seed, spec), out)
    return out


def run(cmd: list[str]) -> dict:
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--large", action="store_true", help="also the 1000-slice series")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-throughput", action="store_true", help="leave out the Celery throughput run")
    p.add_argument("--no-ingest", action="store_true", help="leave out the DIMSE ingest run (Orthanc)")
    args = p.parse_args()
    machine = {"machine": platform.machine(), "cpus": __import__("os").cpu_count(), "date": str(date.today())}
    sizes = [300, 1000] if args.large else [300]
    for n in sizes:
        series = phantom_series(n, 3_000_000 + n)
        r = run([sys.executable, "-m", "benchmarks.bench_inference", str(series), "--device", args.device])
        print(json.dumps({"benchmark": f"pipeline-{n}x512x512", **machine, **r}), flush=True)
    r = run([sys.executable, "benchmarks/bench_encode.py"])
    print(json.dumps({"benchmark": "encode-seg-sr", **machine, **r}), flush=True)
    print(json.dumps({**run([sys.executable, "-m", "benchmarks.bench_store"]), **machine}), flush=True)
    print(json.dumps({**run([sys.executable, "-m", "benchmarks.bench_stow"]), **machine}), flush=True)
    if not args.no_ingest:
        print(json.dumps({**run([sys.executable, "-m", "benchmarks.bench_ingest"]), **machine}), flush=True)
    if not args.no_throughput:
        r = run([sys.executable, "-m", "benchmarks.bench_throughput"])
        print(json.dumps({"benchmark": "throughput-celery-1-2-workers", **machine, **r}), flush=True)


if __name__ == "__main__":
    main()
