"""Progress of long loops (training, evaluation): a bar with the time left on a terminal,
a log line every `every_s` seconds with the time left otherwise (services, CI, pipes)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

log = logging.getLogger("nodal.progress")


def progress(
    items: Iterable[T], total: int, what: str, *, every_s: float = 30.0, terminal: bool | None = None
) -> Iterator[T]:
    """Yield `items` (`total` of them) while showing how far `what` got and how long is left."""
    if terminal is None:
        terminal = sys.stderr.isatty()
    if terminal:
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=what, dynamic_ncols=True, leave=False)
        return
    started = last = time.monotonic()
    for done, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= every_s or done == total:
            last = now
            elapsed = now - started
            left = elapsed / done * (total - done)
            log.info("%s: %d/%d, %s elapsed, about %s left", what, done, total, _clock(elapsed), _clock(left))


def _clock(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
