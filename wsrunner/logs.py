"""Logging set-up: one event per line, with the task and workspace ids when there are some.

JSON lines (for journald and log shippers) unless stderr is a terminal, where people read
plain text; `log_format` forces either. Under journald each line starts with its syslog
priority (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug; sd-daemon(3)), so
`journalctl -p err` finds the errors. Messages never carry secrets: tokens, credentials and
clone URLs with userinfo are kept out of every `logger` call in wsrunner.
"""

from __future__ import annotations

import json
import logging
import os
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


class JournalFormatter(logging.Formatter):
    """Another formatter's line behind the `<N>` syslog priority journald reads (sd-daemon(3))."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_syslog_priority(record.levelno)}>{self._inner.format(record)}"


def _syslog_priority(levelno: int) -> int:
    """crit 2, err 3, warning 4, info 6, debug 7 (levels in between take the more severe)."""
    for threshold, priority in (
        (logging.CRITICAL, 2),
        (logging.ERROR, 3),
        (logging.WARNING, 4),
        (logging.INFO, 6),
    ):
        if levelno >= threshold:
            return priority
    return 7


def _stderr_is_journal() -> bool:
    """Whether stderr is the stream systemd connected to journald (`JOURNAL_STREAM`).

    Compared with stderr's device and inode, as systemd.exec(5) asks: a process started with
    the variable but another stderr (a command's output redirected to a file) is not logging
    to the journal.
    """
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, AttributeError):  # unset, malformed, or stderr has no fd
        return False


def setup_logging(level: str, log_format: str = "auto") -> None:
    """Log to stderr: `log_format` is "json", "text", or "auto" (text on a terminal).

    Under journald (`JOURNAL_STREAM` names stderr) every line starts with its `<N>` priority.
    """
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    formatter: logging.Formatter = JsonFormatter() if use_json else TextFormatter()
    if _stderr_is_journal():
        formatter = JournalFormatter(formatter)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Per-request access lines belong to the frontend's own logger, not to INFO noise.
    logging.getLogger("hypercorn.access").setLevel(logging.WARNING)
