"""Logging set-up: one event per line, with the task and workspace ids when there are some.

JSON lines (for journald and log shippers) unless stderr is a terminal, where people read
plain text; `log_format` forces either. Messages never carry secrets: tokens, credentials and
clone URLs with userinfo are kept out of every `logger` call in wsrunner.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Final

_CONTEXT_KEYS: Final = (
    "task_id",
    "workspace_id",
    "claim_id",
    "schema",
    "policy",
    "rule",
    "rule_source",
)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [f"{k}={getattr(record, k)}" for k in _CONTEXT_KEYS if getattr(record, k, None)]
        return f"{line} {' '.join(extras)}" if extras else line


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "message", task_id?, workspace_id?, ..., "exception"?}`."""

    def format(self, record: logging.LogRecord) -> str:
        event = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in _CONTEXT_KEYS:
            value = getattr(record, key, None)
            if value:
                event[key] = str(value)
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event, ensure_ascii=False)


def setup_logging(level: str, log_format: str = "auto") -> None:
    """Log to stderr: `log_format` is "json", "text", or "auto" (text on a terminal)."""
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Per-request access lines belong to the frontend's own logger, not to INFO noise.
    logging.getLogger("hypercorn.access").setLevel(logging.WARNING)
