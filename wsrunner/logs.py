"""Logging set-up: one line per event, with the task and workspace ids when there are some."""

from __future__ import annotations

import logging
import sys
from typing import Final

_CONTEXT_KEYS: Final = ("task_id", "workspace_id", "claim_id")


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [f"{k}={getattr(record, k)}" for k in _CONTEXT_KEYS if getattr(record, k, None)]
        return f"{line} {' '.join(extras)}" if extras else line


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Per-request access lines belong to the frontend's own logger, not to INFO noise.
    logging.getLogger("hypercorn.access").setLevel(logging.WARNING)
