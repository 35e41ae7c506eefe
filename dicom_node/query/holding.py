"""Where C-MOVE sub-operations for nodal's own retrievals land.

A C-MOVE to nodal itself brings the instances in on nodal's C-STORE receiver, in the serve
process, while the job that asked for them runs in a worker. They must not look like a study
that arrived for analysis (that would analyse the prior a second time and send its results
again), so before the C-MOVE the job leaves a marker, `<data_dir>/retrieve/expected/<series
UID>`, naming its folder; the receiver, seeing a marker for an instance's series, writes the
instance there instead of the spool and answers success. The job removes the marker when the
C-MOVE has ended. Serve process and workers share `data_dir` (scale-out: shared storage).
A marker older than `STALE_SECONDS` (left by a worker killed during its C-MOVE) is deleted
when next seen, so that the series it named arrives normally again.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dicom_node.spool.part10 import file_meta_prefix

_UID = re.compile(r"^[0-9.]{1,64}$")
STALE_SECONDS = 3600.0  # longer than any retrieval may take (query timeouts are per message)


def safe_uid(uid: str, what: str) -> str:
    """A UID that may name a file (digits and dots), or ValueError."""
    if not _UID.match(uid):
        raise ValueError(f"{what} {uid!r} is not a UID")
    return uid


class Holding:
    def __init__(self, data_dir: Path):
        self.root = data_dir / "retrieve"
        self.expected = self.root / "expected"

    def waiting(self) -> bool:
        """Whether any retrieval waits for C-MOVE sub-operations (one directory read)."""
        try:
            with os.scandir(self.expected) as entries:
                return next(entries, None) is not None
        except FileNotFoundError:
            return False

    def folder_for(self, series_uid: str) -> Path | None:
        """The folder a retrieval expects this series' instances in, or None."""
        if not _UID.match(series_uid):
            return None
        marker = self.expected / series_uid
        try:
            if time.time() - marker.stat().st_mtime > STALE_SECONDS:
                marker.unlink(missing_ok=True)
                return None
            return self.root / marker.read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def sweep(self) -> int:
        """Delete what retrievals left behind longer than `STALE_SECONDS` ago (a worker killed
        mid-retrieval): markers and folders. Returns how many entries went."""
        import shutil

        gone = 0
        cutoff = time.time() - STALE_SECONDS
        for folder in (self.expected, self.root):
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                if entry == self.expected or entry.stat().st_mtime > cutoff:
                    continue
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                gone += 1
        return gone

    @contextmanager
    def expect(self, series_uid: str, folder: Path) -> Iterator[None]:
        """While inside, instances of `series_uid` arriving at the receiver go to `folder`."""
        safe_uid(series_uid, "Series Instance UID")
        if not folder.is_relative_to(self.root):
            raise ValueError(f"a C-MOVE retrieval folder must be below {self.root}, not {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        self.expected.mkdir(parents=True, exist_ok=True)
        marker = self.expected / series_uid
        tmp = self.expected / f".{series_uid}.{uuid.uuid4().hex}"
        tmp.write_text(str(folder.relative_to(self.root)))
        tmp.rename(marker)
        try:
            yield
        finally:
            marker.unlink(missing_ok=True)

    @staticmethod
    def store(
        folder: Path,
        sop_class_uid: str,
        sop_uid: str,
        transfer_syntax_uid: str,
        dataset: bytes,
        source_ae: str,
    ) -> Path:
        """Write one instance as a Part 10 file (complete files only: written, then renamed)."""
        safe_uid(sop_uid, "SOP Instance UID")
        path = folder / f"{sop_uid}.dcm"
        tmp = folder / f".{sop_uid}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(file_meta_prefix(sop_class_uid, sop_uid, transfer_syntax_uid, source_ae))
            f.write(dataset)
        tmp.rename(path)
        return path
