"""The request log: one JSON line per finished generation on the ``guard.requests`` logger.

A line carries counts, ids and timings, never prompt or answer text unless the telemetry was
built with ``log_content=True`` (``guard serve --log-content``), which adds ``prompt`` and
``output``. The line is only built when the logger is enabled for INFO, so a library user who
configures no logging pays nothing. ``guard serve`` installs :func:`install_request_log`.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any, TextIO

REQUEST_LOGGER = "guard.requests"

FIELDS = (
    "request_id",
    "log_id",
    "policy",
    "policy_hash",
    "model",
    "outcome",
    "finish_reason",
    "prompt_tokens",
    "output_tokens",
    "sampled_tokens",
    "resets",
    "retries",
    "monitors_fired",
    "ttft_s",
    "duration_s",
)
"""The fields of a request line after ``ts``, ``level`` and ``event``, in order."""

# A library logger: without configured logging, lines go nowhere (not to logging's last resort).
logging.getLogger(REQUEST_LOGGER).addHandler(logging.NullHandler())


class JsonLineFormatter(logging.Formatter):
    """``{"ts", "level", "event", ...}`` per record; a record's ``guard_fields`` dict supplies the rest.

    A record without ``guard_fields`` (any other log call on the logger) becomes
    ``{"ts", "level", "event": "log", "logger", "message"}``, so the stream stays JSON lines.
    """

    def format(self, record: logging.LogRecord) -> str:
        head = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
        }
        fields: dict[str, Any] | None = getattr(record, "guard_fields", None)
        if fields is None:
            body = {"event": "log", "logger": record.name, "message": record.getMessage()}
        else:
            body = {"event": record.getMessage(), **fields}
        return json.dumps({**head, **body}, ensure_ascii=False, default=str)


def install_request_log(stream: TextIO | None = None) -> logging.Handler:
    """Send ``guard.requests`` lines, JSON only, to ``stream`` (stderr); they no longer propagate
    to the root logger (whose format would wrap them). Returns the handler (to remove it)."""
    logger = logging.getLogger(REQUEST_LOGGER)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLineFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return handler
