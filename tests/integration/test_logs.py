"""Log lines as the daemon writes them: JSON lines, with a syslog priority under journald."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from wsrunner.logs import setup_logging

LEVELS = [
    (logging.DEBUG, "<7>"),
    (logging.INFO, "<6>"),
    (logging.WARNING, "<4>"),
    (logging.ERROR, "<3>"),
    (logging.CRITICAL, "<2>"),
]


@pytest.fixture(name="stderr_file")
def _stderr_file(tmp_path: Path) -> Iterator[Path]:
    """The file stderr will be (not a terminal, as under systemd); the root logger is restored."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield tmp_path / "stderr"
    root.handlers[:] = handlers
    root.setLevel(level)


def _log_each_level(path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    with path.open("a") as stream:
        monkeypatch.setattr(sys, "stderr", stream)  # here: pytest sets its own for the call
        setup_logging("DEBUG")  # as `wsrunner serve` does with the default log_format ("auto")
        for levelno, _ in LEVELS:
            logging.getLogger("wsrunner.test").log(levelno, "at %s", logging.getLevelName(levelno))
        logging.getLogger().handlers.clear()  # nothing writes to the closed file after
    return path.read_text().splitlines()


def test_under_journald_each_line_starts_with_its_priority(
    stderr_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stderr_file.touch()
    st = os.stat(stderr_file)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    lines = _log_each_level(stderr_file, monkeypatch)
    assert [line[:3] for line in lines] == [prefix for _, prefix in LEVELS], lines
    for line, (levelno, _) in zip(lines, LEVELS, strict=True):
        event = json.loads(line[3:])  # the JSON line follows the prefix unchanged
        assert event["level"] == logging.getLevelName(levelno), line


def test_without_journald_no_prefix(stderr_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    lines = _log_each_level(stderr_file, monkeypatch)
    assert len(lines) == len(LEVELS) and all(line.startswith("{") for line in lines), lines
    assert [json.loads(line)["message"] for line in lines][-1] == "at CRITICAL"


def test_journal_stream_of_another_file_is_not_stderr(
    stderr_file: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A process that inherited JOURNAL_STREAM but writes stderr elsewhere gets no prefix."""
    other = os.stat(tmp_path)
    monkeypatch.setenv("JOURNAL_STREAM", f"{other.st_dev}:{other.st_ino}")
    assert all(line.startswith("{") for line in _log_each_level(stderr_file, monkeypatch))
