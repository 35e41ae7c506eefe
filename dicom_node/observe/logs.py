"""Logging: text or JSON lines, the level from the configuration.

`logging.format: json` writes one JSON object per line with `time`, `level`, `logger`,
`message` and the structured fields a line carries (`extra=`: `event`, `job_id`,
`study_key`, `destination`, `calling_ae`, `count`, ...). Lines name studies by their
`study_key` (see `dicom_node.observe.audit.study_key`) and never carry patient name, ID or birth
date.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from dicom_node.config import Settings

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
QUIET_LIBRARIES = (
    "highdicom",
    "pynetdicom",
    "urllib3",
    "dicomweb_client",
    "uvicorn",
    "orthanc_api_client",
    "alembic",  # one line per migration step otherwise
    "celery",
    "kombu",
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value if isinstance(value, str | int | float | bool | type(None)) else str(value)  # type: ignore[assignment]
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


class StderrHandler(logging.StreamHandler):
    """Writes to the `sys.stderr` of the moment of each line, not of the moment of set-up.

    A plain `StreamHandler()` keeps the stream it found when it was made. If that stream is
    later replaced and closed (a supervisor's redirect, a test's captured output), a line
    logged afterwards by any thread (an association ending, a worker) fails with "I/O
    operation on closed file" and is lost. The standard library's own last-resort handler
    looks the stream up at each line for the same reason.
    """

    def __init__(self, level: int = logging.NOTSET) -> None:
        logging.Handler.__init__(self, level)  # StreamHandler.__init__ would pin a stream

    @property
    def stream(self):
        return sys.stderr


def configure_logging(settings: Settings) -> None:
    """Root logger from `logging`; chatty libraries (pynetdicom logs per instance) held at WARNING."""
    handler = StderrHandler()
    if settings.logging.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.logging.level)
    quiet = max(logging.WARNING, root.level)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(quiet)
