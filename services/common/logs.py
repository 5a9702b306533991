"""Logging: one line per record, with the service name and the request id of the call."""

from __future__ import annotations

import logging

from services.common.interceptors import request_id


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get() or "-"
        return True


def setup_logging(service: str, level: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s {service} %(levelname)s [%(request_id)s] %(name)s: %(message)s"
        )
    )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
