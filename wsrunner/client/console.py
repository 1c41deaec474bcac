"""The commands that talk to a daemon over HTTP: `wsrunner submit` and `wsrunner tasks ...`.

The server and token come from `--url`/`--token`, else `WSRUNNER_URL`/`WSRUNNER_TOKEN`, else
the YAML file `WSRUNNER_CLIENT_CONFIG` (default `$XDG_CONFIG_HOME/wsrunner/client.yaml`, else
`~/.config/wsrunner/client.yaml`; keys `url` and `token`). Output is lines for people, or one JSON
document per command with `--json`. `submit --wait` and `tasks watch` follow the task's events
(resuming after a dropped connection) and exit with its outcome.

Errors: never a traceback, but one line on stderr and an exit code (`EXIT_CODES_HELP`; 0, 1, 3
and 4 are the task's outcome): 2 for a usage or request error (a 4xx answer), 69 (EX_UNAVAILABLE)
when the daemon cannot be reached (refused, timed out, TLS, a broken connection) or answers with a
server error (5xx).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Final

import httpx
import trio
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from wsrunner.client import TERMINAL, ApiError, Client, Event, Task
from wsrunner.models import TaskState

EXIT_CODES: Final = {"completed": 0, "failed": 1, "timed_out": 3, "cancelled": 4}
USAGE_ERROR: Final = 2  # argparse's code for a bad command line, also used for request errors
EX_UNAVAILABLE: Final = 69  # sysexits.h: the service is unavailable
DEFAULT_URL: Final = "http://127.0.0.1:8080"
EXIT_CODES_HELP: Final = """\
  0   done (--wait, watch: the task completed)
  1   the task failed
  2   usage or request error (bad arguments, config file or token; a 4xx answer)
  3   the task timed out
  4   the task was cancelled
  69  the daemon is unavailable: cannot connect, timeout, TLS error, or a 5xx answer"""


def add_parsers(sub: Any) -> None:
    """Add `submit` and `tasks` to the CLI's subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        help="public API address (default: $WSRUNNER_URL, the client "
        f"config file, or {DEFAULT_URL})",
    )
    common.add_argument(
        "--token", help="bearer token (default: $WSRUNNER_TOKEN or the client config file)"
    )
    common.add_argument("--json", action="store_true", help="print JSON")

    submit = sub.add_parser(
        "submit",
        parents=[common],
        help="submit a task and print its id",
        description="Submit a task: one shell command (after --) or the steps of a YAML/JSON "
        "file. Prints the task id; with --wait, follows the task and exits with its outcome.",
        epilog="examples:\n"
        "  wsrunner submit --workspace ws-1 -- make test\n"
        "  wsrunner submit --workspace ws-1 --steps steps.yaml --wait\n"
        "  wsrunner submit --workspace ws-1 --priority high --json -- 'echo hi'\n\n"
        "exit codes:\n" + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    submit.add_argument("--workspace", required=True, metavar="ID", help="workspace id")
    submit.add_argument(
        "--priority",
        default="normal",
        choices=["critical", "high", "normal", "low"],
        help="queue priority",
    )
    submit.add_argument(
        "--timeout",
        type=int,
        default=300,
        metavar="SECONDS",
        help="task timeout, 10-3600 (default 300)",
    )
    submit.add_argument(
        "--steps",
        type=Path,
        metavar="FILE",
        help="a YAML or JSON list of steps instead of a command",
    )
    submit.add_argument("--idempotency-key", metavar="KEY", help="retry-safe submission key")
    submit.add_argument("--wait", action="store_true", help="follow the task to its end")
    submit.add_argument("shell", nargs="*", metavar="COMMAND", help="the shell command, after --")

    examples = (
        "examples:\n"
        "  wsrunner tasks list --workspace ws-1 --status running\n"
        "  wsrunner tasks show ID --json\n"
        "  wsrunner tasks watch ID\n\nexit codes:\n" + EXIT_CODES_HELP
    )
    raw = argparse.RawDescriptionHelpFormatter
    tasks = sub.add_parser(
        "tasks",
        help="list, show, cancel or watch tasks",
        description="Look at and act on tasks of the public API.",
        epilog=examples,
        formatter_class=raw,
    )
    actions = tasks.add_subparsers(dest="action", required=True)
    listing = actions.add_parser(
        "list", parents=[common], help="newest tasks first", epilog=examples, formatter_class=raw
    )
    listing.add_argument("--workspace", metavar="ID", help="only this workspace")
    listing.add_argument(
        "--status", choices=[s.value for s in TaskState], help="only tasks in this state"
    )
    listing.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    for name, text in (
        ("show", "a task's record"),
        ("cancel", "cancel a queued or running task"),
        ("watch", "follow a task's events to its end"),
    ):
        action = actions.add_parser(
            name, parents=[common], help=text, epilog=examples, formatter_class=raw
        )
        action.add_argument("task_id", metavar="ID")


def _client_config_path() -> Path:
    """`$WSRUNNER_CLIENT_CONFIG`, else `client.yaml` in the XDG config directory."""
    if explicit := os.environ.get("WSRUNNER_CLIENT_CONFIG"):
        return Path(explicit)
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    # The XDG spec: a relative (or empty) XDG_CONFIG_HOME is invalid and to be ignored.
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".config"
    return base / "wsrunner" / "client.yaml"


def _client_config() -> dict[str, Any]:
    path = _client_config_path()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    if not isinstance(data, dict) or set(data) - {"url", "token"}:
        raise ValueError(f"{path}: expected a mapping with the keys url and token")
    return data


def run(args: argparse.Namespace) -> int:
    try:
        config = _client_config()
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"wsrunner: {exc}", file=sys.stderr)
        return 2
    args.url = args.url or os.environ.get("WSRUNNER_URL") or config.get("url") or DEFAULT_URL
    args.token = args.token or os.environ.get("WSRUNNER_TOKEN") or config.get("token")
    if not args.token:
        print(
            "wsrunner: no token; pass --token, set WSRUNNER_TOKEN, or put it in the client "
            "config file",
            file=sys.stderr,
        )
        return 2
    try:
        code: int = trio.run(_run, args)
    except ApiError as exc:
        if exc.status >= 500:  # the daemon is there but cannot serve: not the caller's fault
            print(f"wsrunner: {args.url}: {_one_line(exc)}", file=sys.stderr)
            return EX_UNAVAILABLE
        print(f"wsrunner: {_one_line(exc)}", file=sys.stderr)
        return USAGE_ERROR
    except httpx.InvalidURL as exc:
        print(f"wsrunner: invalid --url {args.url!r}: {_one_line(exc)}", file=sys.stderr)
        return USAGE_ERROR
    except httpx.HTTPError as exc:  # refused, timed out, TLS, a broken or garbled connection
        print(f"wsrunner: cannot reach {args.url}: {_reason(exc)}", file=sys.stderr)
        return EX_UNAVAILABLE
    except (OSError, ValueError) as exc:
        print(f"wsrunner: {_one_line(exc)}", file=sys.stderr)
        return USAGE_ERROR
    return code


def _one_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _reason(exc: BaseException) -> str:
    """The innermost cause's message, on one line: httpx wraps the socket's or ssl's error, and
    trio gathers one per address tried into a group."""
    reason = _one_line(exc)
    seen = {id(exc)}
    while True:
        inner = (
            exc.exceptions[0]
            if isinstance(exc, BaseExceptionGroup)
            else exc.__cause__ or exc.__context__
        )
        if inner is None or id(inner) in seen:
            return reason
        seen.add(id(inner))
        exc = inner
        if str(exc).strip():
            reason = _one_line(exc)


async def _run(args: argparse.Namespace) -> int:
    async with Client(args.url, args.token) as wsr:
        if args.command == "submit":
            return await _submit(wsr, args)
        if args.action == "list":
            found = []
            async for task in wsr.list(workspace_id=args.workspace, status=args.status):
                found.append(task)
                if len(found) >= args.limit:
                    break
            _print_tasks(found, args.json)
            return 0
        if args.action == "show":
            task = await wsr.get(args.task_id)
            print(json.dumps(task.raw, indent=2) if args.json else _describe(task))
            return 0
        if args.action == "cancel":
            await wsr.cancel(args.task_id)
            print(
                json.dumps({"id": args.task_id, "status": "cancelled"})
                if args.json
                else f"task {args.task_id} cancelled"
            )
            return 0
        await wsr.get(args.task_id)  # an unknown task or a daemon that is down: say so at once
        return await _watch(wsr, args.task_id, args.json)


async def _submit(wsr: Client, args: argparse.Namespace) -> int:
    if args.steps is not None:
        steps = await trio.to_thread.run_sync(lambda: yaml.safe_load(args.steps.read_text()))
        if not isinstance(steps, list):
            raise ValueError(f"{args.steps}: expected a list of steps")
    elif args.shell:
        steps = [{"action": "execute_command", "command": " ".join(args.shell)}]
    else:
        raise ValueError("give a command after -- or a --steps file")
    accepted = await wsr.submit(
        args.workspace,
        steps,
        priority=args.priority,
        timeout_seconds=args.timeout,
        idempotency_key=args.idempotency_key,
    )
    if not args.wait:
        print(
            json.dumps({"task_id": accepted.task_id, "status": accepted.status})
            if args.json
            else accepted.task_id
        )
        return 0
    if not args.json:
        print(accepted.task_id, file=sys.stderr)
    return await _watch(wsr, accepted.task_id, args.json)


async def _watch(wsr: Client, task_id: str, as_json: bool) -> int:
    """Follow the task to its end and exit with its outcome.

    On a terminal: a live progress bar (step k of n) under the output as it arrives. Otherwise
    plain lines (output to stdout/stderr, step headers to stderr), or a JSON line per event.
    """
    if not as_json:
        queued = await wsr.get(task_id)
        if queued.waiting:
            print(f"queued: {_waiting(queued.waiting)}", file=sys.stderr, flush=True)
    if as_json:
        async for event in wsr.events(task_id):
            print(json.dumps({"id": event.id, "event": event.type, "data": event.data}), flush=True)
    elif sys.stdout.isatty():
        await _watch_live(wsr, task_id)
    else:
        async for event in wsr.events(task_id):
            _print_event(event)
    task = await wsr.get(task_id)
    if not as_json:
        ms = task.raw.get("execution_time_ms")
        print(
            f"task {task.id} {task.status}"
            + (f" in {ms / 1000:.1f}s" if ms is not None else "")
            + (f": {task.error_message}" if task.error_message else ""),
            file=sys.stderr,
        )
    return EXIT_CODES.get(task.status, 1)


async def _watch_live(wsr: Client, task_id: str) -> None:
    console = Console()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        bar = progress.add_task("queued", total=None)
        async for event in wsr.events(task_id):
            data = event.data
            if event.type == "progress_update":
                progress.update(
                    bar,
                    total=data.get("total_steps"),
                    completed=int(data.get("step", 1)) - 1,
                    description=f"step {data.get('step')}/{data.get('total_steps')} "
                    f"{data.get('description', '')}",
                )
            elif event.type == "output":
                console.print(
                    str(data.get("data", "")),
                    end="",
                    markup=False,
                    highlight=False,
                    style="red" if data.get("stream") == "stderr" else None,
                )
            elif event.type == "error":
                console.print(
                    f"step {data.get('step')}: {data.get('error')}", style="bold red", markup=False
                )
            elif event.type == "status_changed":
                if data.get("status") == "running":
                    progress.update(bar, description="running")
                elif data.get("status") in TERMINAL:
                    progress.update(bar, completed=progress.tasks[0].total or 0)


def _print_event(event: Event) -> None:
    data = event.data
    if event.type == "output":
        stream = sys.stdout if data.get("stream") == "stdout" else sys.stderr
        stream.write(str(data.get("data", "")))
        stream.flush()
    elif event.type == "progress_update":
        print(
            f"[{data.get('step')}/{data.get('total_steps')}] {data.get('description', '')}",
            file=sys.stderr,
            flush=True,
        )
    elif event.type == "error":
        print(f"step {data.get('step')}: {data.get('error')}", file=sys.stderr, flush=True)


def _describe(task: Task) -> str:
    lines = [
        f"task       {task.id}",
        f"workspace  {task.workspace_id}",
        f"status     {task.status}",
        f"priority   {task.priority}",
        f"submitted  {task.submitted_at}",
        f"attempts   {task.attempts}",
    ]
    if task.waiting:
        lines.append(f"waiting    {_waiting(task.waiting)}")
    if task.error_message:
        lines.append(f"error      {task.error_message}")
    return "\n".join(lines)


def _waiting(waiting: dict[str, Any]) -> str:
    return f"#{waiting.get('position')} in line; {waiting.get('reason')}"


def _print_tasks(tasks: list[Task], as_json: bool) -> None:
    if as_json:
        print(json.dumps([t.raw for t in tasks]))
        return
    for t in tasks:
        print(f"{t.id}  {t.status:<9}  {t.priority:<8}  {t.workspace_id}  {t.submitted_at}")
