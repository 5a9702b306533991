"""Logging: one JSON object per line (LOG_FORMAT=json, the default) with the service, the
request id of the call, the job in hand and the current trace and span ids, so a line can be
joined to its trace and a trace to its lines; LOG_FORMAT=text for a terminal."""

from __future__ import annotations

import contextvars
import json
import logging
from datetime import UTC, datetime
from typing import Any

from services.common import tracing
from services.common.interceptors import request_id

# The job the current task works on (a generator's attempt, a gateway's call about one job).
job_id: contextvars.ContextVar[str] = contextvars.ContextVar("job_id", default="")


def _context() -> dict[str, str]:
    """The ids of what the emitting task is doing (absent ones left out)."""
    trace_id, span_id = tracing.trace_ids()
    ids = {
        "request_id": request_id.get(),
        "job_id": job_id.get(),
        "trace_id": trace_id,
        "span_id": span_id,
    }
    return {k: v for k, v in ids.items() if v}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "message": record.getMessage(),
            **_context(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class _TextIds(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ids = _context()
        record.ids = " ".join(f"{k}={v}" for k, v in ids.items() if k != "span_id") or "-"
        return True


def setup_logging(service: str, level: str, form: str = "json") -> None:
    handler = logging.StreamHandler()
    if form == "text":
        handler.addFilter(_TextIds())
        handler.setFormatter(
            logging.Formatter(
                f"%(asctime)s {service} %(levelname)s [%(ids)s] %(name)s: %(message)s"
            )
        )
    else:
        handler.setFormatter(JsonFormatter(service))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
