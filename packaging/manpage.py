"""Write wsrunner(1) from the command's own argparse help, so the manual page cannot drift.

    python packaging/manpage.py DATE > wsrunner.1      (DATE: YYYY-MM-DD, the page's date)

Run by packaging/build.sh with the project's virtualenv. Each command's `--help` text is set
verbatim (no-fill), as `wsrunner CMD --help` prints it at 80 columns.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator

FILES = (
    ("/etc/wsrunner/wsrunner.conf", "the daemon's settings (YAML), every key documented"),
    ("/etc/wsrunner/policy.yaml", "the command policy; drop-in overlays in policy.d/"),
    ("/etc/wsrunner/credentials/", "secrets: internal-token, database-url, redis-url (root only)"),
    ("/etc/default/wsrunner", "non-secret KEY=value settings of wsrunner.service"),
    ("/var/lib/wsrunner/workspaces/", "the workspaces; never removed by the package"),
    ("/var/cache/wsrunner/", "the service's extracted copy of this zipapp (SHIV_ROOT)"),
)

ENVIRONMENT = (
    ("WSRUNNER_CONFIG", "the settings file when --config is not given"),
    ("SHIV_ROOT", "where the zipapp extracts its Python libraries on first run, one directory "
     "per build (default ~/.shiv; the service uses /var/cache/wsrunner)"),
)  # fmt: skip


def _roff(text: str) -> str:
    """Text as roff shows it literally: backslashes and hyphens escaped, no line a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line
                     for line in text.splitlines())  # fmt: skip


def _commands(
    parser: argparse.ArgumentParser, path: str = "wsrunner"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every command below `parser`, depth first, as (its words, its parser)."""
    for action in parser._actions:  # argparse has no public way to list subcommands.
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{path} {name}", sub
                yield from _commands(sub, f"{path} {name}")


def manpage(date: str) -> str:
    """The whole page, in roff (man macros)."""
    os.environ["COLUMNS"] = "80"  # argparse wraps help at the terminal's width.
    from wsrunner import __version__
    from wsrunner.cli import _parser

    parser = _parser()
    out = [
        f'.TH WSRUNNER 1 "{date}" "wsrunner {__version__}" "User Commands"',
        ".SH NAME",
        "wsrunner \\- workspace task daemon and its command\\-line client",
        ".SH SYNOPSIS",
        ".B wsrunner",
        ".I command",
        "[\\fIoptions\\fR]",
        ".SH DESCRIPTION",
        ".nf",
        _roff(parser.format_help()),
        ".fi",
        ".SH COMMANDS",
    ]
    for words, sub in _commands(parser):
        out += [f".SS {_roff(words)}", ".nf", _roff(sub.format_help()), ".fi"]
    out.append(".SH FILES")
    for path, what in FILES:
        out += [".TP", f".I {_roff(path)}", _roff(what)]
    out.append(".SH ENVIRONMENT")
    for name, what in ENVIRONMENT:
        out += [".TP", f".B {name}", _roff(what)]
    out += [
        ".SH SEE ALSO",
        ".BR systemctl (1),",
        ".BR journalctl (1);",
        "/usr/share/doc/wsrunner/README.md",
    ]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(manpage(sys.argv[1]))
