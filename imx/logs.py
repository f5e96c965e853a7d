"""Structured, PHI-free logging: one JSON object per line on stderr.

Our own loggers (``imx.*``) log events with fields we choose: pseudonymous ids, our generated
keys, partner names, status codes, never names, patient ids or original UIDs. Third-party
libraries (pydicom, pynetdicom) can put dataset values into their messages, so their records are
reduced to logger name and level unless ``IMX_LOG_LIBRARIES=1`` is set for debugging on test data.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
import warnings
from typing import Any


class JsonFormatter(logging.Formatter):
    def __init__(self, show_libraries: bool = False) -> None:
        super().__init__()
        self.show_libraries = show_libraries

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
        }
        if record.name.startswith("imx") or self.show_libraries:
            out["event"] = record.getMessage()
            fields = getattr(record, "fields", None)
            if fields:
                out.update(fields)
            if record.exc_info and record.name.startswith("imx"):
                out["error"] = type(record.exc_info[1]).__name__
        else:
            out["event"] = "library message suppressed (may contain PHI)"
        return json.dumps(out, ensure_ascii=False, default=str)


def setup_logging(level: str = "INFO") -> None:
    show = os.environ.get("IMX_LOG_LIBRARIES") == "1"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(show))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries speak only when something is really wrong, and then without their message text.
    for name in ("pydicom", "pynetdicom", "minio", "urllib3", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.ERROR if not show else logging.INFO)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    if not show:
        # pydicom warns with element values ("Invalid value for VR ...")
        warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
        warnings.filterwarnings("ignore", category=UserWarning)


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log ``name`` with ``fields``; callers pass only PHI-free values."""
    logger.log(level, name, extra={"fields": fields})
