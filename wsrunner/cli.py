"""The `wsrunner` command: `wsrunner serve` runs the daemon."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

# trio_asyncio patches asyncio at import; it must come before psycopg (stack.md §4.2).
import trio_asyncio  # noqa: F401  # isort: skip
import trio

from wsrunner import __version__
from wsrunner.daemon import Daemon, run_daemon
from wsrunner.errors import ConfigError, UnavailableError
from wsrunner.logs import setup_logging
from wsrunner.settings import Settings, load_settings

logger = logging.getLogger("wsrunner")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsrunner", description=__doc__)
    parser.add_argument("--version", action="version", version=f"wsrunner {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run the daemon",
        description="Run the daemon: task slots, poller, heartbeat, reaper and the HTTP APIs. "
        "Settings come from the environment (REDIS_URL, DATABASE_URL, WORKER_CONCURRENCY, ...) "
        "and an optional YAML file; see the README for every key.",
    )
    serve.add_argument(
        "--config", metavar="FILE", help="YAML settings file (default: $WSRUNNER_CONFIG)"
    )
    return parser


async def _serve(settings: Settings) -> None:
    """Run the daemon; SIGTERM/SIGINT stop it gracefully, a second one stops it at once."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def run(*, task_status: trio.TaskStatus[Daemon]) -> None:
                await run_daemon(settings, task_status=task_status)
                nursery.cancel_scope.cancel()  # done: stop listening for signals

            daemon = await nursery.start(run)
            async for signum in signals:
                if not daemon.stopping.is_set():
                    logger.info("%s: stopping gracefully (send it again to stop now)",
                                signal.Signals(signum).name)  # fmt: skip
                    daemon.stop()
                else:
                    logger.warning("second signal: stopping now")
                    nursery.cancel_scope.cancel()


def _find(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """`exc`, or the first `kind` inside (nested) exception groups."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _find(inner, kind)) is not None:
                return found
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"wsrunner: invalid configuration: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    try:
        trio.run(_serve, settings)
    except (Exception, BaseExceptionGroup) as exc:
        if (cfg := _find(exc, ConfigError)) is not None:
            print(f"wsrunner: invalid configuration: {cfg}", file=sys.stderr)
            return 2
        if (down := _find(exc, UnavailableError)) is not None:
            print(f"wsrunner: cannot start: {str(down).splitlines()[0]}", file=sys.stderr)
            return 1
        raise
    return 0
