"""STOW-RS body parser benchmark: a multipart/related body streamed to one file per part.

The 300 instances (525 KB each) of the store benchmark's phantom in one STOW-RS body with
a 73-character boundary (what Orthanc sends), fed to the parser in 64 KiB chunks (what
uvicorn hands the endpoint) and each part written to its own file as it arrives, as the
STOW-RS endpoint does (no sync: the parser's and the copy's cost, not the disk's). Each
parser is run `--rounds` times, alternating; the figure is the best round's MB/s.

- `nodal`: `dicom_node.receive.multipart.MultipartParser` (the one the endpoint uses);
- `python-multipart`: `python_multipart.MultipartParser` with callbacks, when installed
  (`pip install python-multipart`); it is not a dependency of nodal;
- `--also FILE`: another version of `dicom_node/receive/multipart.py` (e.g. an earlier one from
  `git show COMMIT:dicom_node/receive/multipart.py`), run the same way, for a before/after in one run.

`--sink null` drops the parts instead of writing them: the parser's own cost alone.

    .venv/bin/python -m benchmarks.bench_stow [--rounds 5] [--sink files|null] [--also FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import date
from pathlib import Path

from benchmarks.run import phantom_series
from dicom_node.receive.multipart import MultipartParser, PartData, PartEnd, PartStart

CHUNK = 65536


def build_body(files: list[bytes], boundary: str) -> bytes:
    out = bytearray()
    for f in files:
        out += f"--{boundary}\r\nContent-Type: application/dicom\r\nContent-Length: {len(f)}\r\n\r\n".encode()
        out += f
        out += b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out)


class Files:
    """One file per part in `folder`, written with os.write as the endpoint does."""

    def __init__(self, folder: Path):
        self.folder, self.n, self.fd = folder, 0, -1

    def start(self) -> None:
        self.n += 1
        self.fd = os.open(self.folder / f"{self.n}.part", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def write(self, data) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def end(self) -> None:
        os.close(self.fd)


class Null(Files):
    """Counts the parts, writes nothing."""

    def start(self) -> None:
        self.n += 1

    def write(self, data) -> None:
        pass

    def end(self) -> None:
        pass


def run_nodal(body: bytes, boundary: str, out: Files) -> None:
    parser = MultipartParser(boundary)
    for i in range(0, len(body), CHUNK):
        for ev in parser.feed(body[i : i + CHUNK]):
            if isinstance(ev, PartData):
                out.write(ev.data)
            elif isinstance(ev, PartStart):
                out.start()
            elif isinstance(ev, PartEnd):
                out.end()
    parser.close()


def run_python_multipart(body: bytes, boundary: str, out: Files) -> None:
    from python_multipart import MultipartParser as PMParser

    callbacks = {
        "on_part_begin": out.start,
        "on_part_data": lambda data, start, end: out.write(memoryview(data)[start:end]),
        "on_part_end": out.end,
    }
    parser = PMParser(boundary, callbacks)
    for i in range(0, len(body), CHUNK):
        parser.write(body[i : i + CHUNK])
    parser.finalize()


def measure(fn: Callable, body: bytes, boundary: str, expected: list[bytes], sink: str) -> float:
    with tempfile.TemporaryDirectory(prefix="nodal-bench-stow-") as tmp:
        out = Files(Path(tmp)) if sink == "files" else Null(Path(tmp))
        t = time.perf_counter()
        fn(body, boundary, out)
        seconds = time.perf_counter() - t
        assert out.n == len(expected), (out.n, len(expected))
        if sink == "files":
            for k in (1, len(expected)):  # the parts came out intact
                assert (Path(tmp) / f"{k}.part").read_bytes() == expected[k - 1]
    return len(body) / seconds / 1e6


def load_parser(path: str):
    """MultipartParser from another copy of dicom_node/receive/multipart.py."""
    spec = importlib.util.spec_from_file_location("multipart_also", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["multipart_also"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=3_000_300)
    p.add_argument("--boundary-length", type=int, default=73, help="at most 73 (70: what RFC 2046 allows)")
    p.add_argument("--sink", choices=("files", "null"), default="files")
    p.add_argument("--also", help="another dicom_node/receive/multipart.py to run beside the current one")
    args = p.parse_args()
    files = [f.read_bytes() for f in sorted(phantom_series(300, args.seed).glob("*.dcm"))]
    # two UUIDs and a dash, 73 characters, as Orthanc's DICOMweb plugin sends
    boundary = f"{uuid.uuid4()}-{uuid.uuid4()}"[: args.boundary_length]
    body = build_body(files, boundary)
    parsers: dict[str, Callable] = {"nodal": run_nodal}
    if args.also:
        also = load_parser(args.also)

        def run_also(body: bytes, boundary: str, out: Files) -> None:
            parser = also.MultipartParser(boundary)
            for i in range(0, len(body), CHUNK):
                for ev in parser.feed(body[i : i + CHUNK]):
                    if isinstance(ev, also.PartData):
                        out.write(ev.data)
                    elif isinstance(ev, also.PartStart):
                        out.start()
                    elif isinstance(ev, also.PartEnd):
                        out.end()
            parser.close()

        parsers[f"also: {Path(args.also).name}"] = run_also
    try:
        import python_multipart

        parsers[f"python-multipart {python_multipart.__version__}"] = run_python_multipart
    except ImportError:
        pass
    rates: dict[str, list[float]] = {name: [] for name in parsers}
    for _ in range(args.rounds):
        for name, fn in parsers.items():
            rates[name].append(measure(fn, body, boundary, files, args.sink))
    print(
        json.dumps(
            {
                "benchmark": "stow-parse-300x512x512",
                "date": str(date.today()),
                "body_mb": round(len(body) / 1e6, 1),
                "boundary_length": len(boundary),
                "chunk_bytes": CHUNK,
                "sink": args.sink,
                "best_mb_per_s": {k: round(max(v), 1) for k, v in rates.items()},
                "rounds_mb_per_s": {k: [round(x) for x in v] for k, v in rates.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
