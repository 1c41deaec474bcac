"""The `wsrunner` command: `serve` runs the daemon, `tokens` manages the public API's tokens,
`submit` and `tasks` talk to a daemon (`wsrunner.client.console`)."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any, Final

# trio_asyncio patches asyncio at import; psycopg must be imported after it.
import trio_asyncio  # noqa: F401  # isort: skip
import trio

from wsrunner import __version__, tools
from wsrunner.backends import provision
from wsrunner.client import console
from wsrunner.daemon import Daemon, describe_store, open_store, run_daemon
from wsrunner.errors import ConfigError, NotFoundError, UnavailableError, ValidationError
from wsrunner.logs import setup_logging
from wsrunner.models import ApiToken, Priority, TokenLimits
from wsrunner.policy import console as policy_console
from wsrunner.settings import Settings, SettingsError, load_settings, policy_paths, settings_file
from wsrunner.tokens import TokenRegistry

logger = logging.getLogger("wsrunner")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsrunner",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  wsrunner serve --config /etc/wsrunner/wsrunner.conf\n"
        "  wsrunner tokens create --name ci-bot --workspace ws-1\n"
        "  wsrunner submit --workspace ws-1 --wait -- make test\n\n"
        "exit codes of serve and tokens: 2 a configuration error, 1 a store is unreachable;\n"
        "exit codes of submit and tasks:\n" + console.EXIT_CODES_HELP,
    )
    parser.add_argument("--version", action="version", version=f"wsrunner {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run the daemon",
        description="Run the daemon: task slots, poller, heartbeat, reaper and the HTTP APIs. "
        "Settings come from the environment (REDIS_URL, DATABASE_URL, WORKER_CONCURRENCY, ...) "
        "and an optional YAML file; see the README for every key.",
    )
    config_help = "YAML settings file (default: $WSRUNNER_CONFIG)"
    serve.add_argument("--config", metavar="FILE", help=config_help)
    tokens = sub.add_parser(
        "tokens",
        help="manage the public API's bearer tokens",
        description="Create, list and revoke bearer tokens of the public API, stored as SHA-256 "
        "digests in the daemon's store (PostgreSQL, or the embedded store); a token is shown "
        "once, at creation. On an installed host, root's commands read what the service reads: "
        "/etc/wsrunner/wsrunner.conf, /etc/wsrunner/credentials/ and /etc/default/wsrunner. "
        "create and revoke print the store they used on stderr.",
    )
    tokens.add_argument("--config", metavar="FILE", help=config_help)
    actions = tokens.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a token and print it once")
    create.add_argument("--name", required=True, help="who or what uses it, e.g. 'ci-bot'")
    scope = create.add_mutually_exclusive_group(required=True)
    scope.add_argument(
        "--workspace",
        action="append",
        metavar="ID",
        dest="workspaces",
        help="a workspace the token may use (repeat for several)",
    )
    scope.add_argument(
        "--all-workspaces", action="store_true", help="the token may use every workspace"
    )
    _limit_arguments(create, "default: ")
    create.add_argument("--json", action="store_true", help="print JSON")
    update = actions.add_parser(
        "update",
        help="change a token's limits (submits see it within 5 s, tasks already queued within "
        "reconcile_interval_s; limits not named stay as they are)",
    )
    update.add_argument("token_id", metavar="ID", help="the id shown by `tokens list`")
    _limit_arguments(update, "unchanged unless given; created with ")
    update.add_argument("--json", action="store_true", help="print JSON")
    listing = actions.add_parser("list", help="list tokens (never their secrets)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    revoke = actions.add_parser("revoke", help="revoke a token by id (effective within 5 s)")
    revoke.add_argument("token_id", metavar="ID", help="the id shown by `tokens list`")
    revoke.add_argument("--json", action="store_true", help="print JSON")
    sub.add_parser(
        "tools",
        help="print the agent tool definitions (JSON)",
        description="Print the workspace tools an agent can call, as served at "
        "GET /api/tools: name, description, category, permission, JSON Schema.",
    )
    config = sub.add_parser(
        "config",
        help="check the daemon's settings",
        description="Validate the settings as `serve` reads them: the YAML file, then the "
        "environment. Exit 0 and print `ok` with the file read; exit 1 with one "
        "`file:line:col: key: message` line per problem.",
    )
    config_actions = config.add_subparsers(dest="action", required=True)
    check = config_actions.add_parser("check", help="validate; exit 1 with located errors")
    check.add_argument("file", nargs="?", metavar="FILE", help=config_help)
    console.add_parsers(sub)
    policy_console.add_parser(sub)
    provision.add_parser(sub)
    return parser


def _count_or_none(text: str) -> int | None:
    if text == "none":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {text!r}")
    return int(text)


def _limit_arguments(parser: argparse.ArgumentParser, defaults: str) -> None:
    """--max-priority, --max-running, --max-queued; each absent from the namespace when not
    given, so that `update` keeps what it does not mention."""
    parser.add_argument(
        "--max-priority",
        choices=[p.value for p in Priority],
        default=argparse.SUPPRESS,
        help=f"the highest priority its tasks may use ({defaults}high; critical only when "
        "granted here)",
    )
    parser.add_argument(
        "--max-running",
        type=_count_or_none,
        default=argparse.SUPPRESS,
        metavar="N|none",
        help=f"its tasks running at once on all daemons; more wait ({defaults}none)",
    )
    parser.add_argument(
        "--max-queued",
        type=_count_or_none,
        default=argparse.SUPPRESS,
        metavar="N|none",
        help=f"its tasks waiting; a submit past it gets 429 ({defaults}none)",
    )


def _limits(args: argparse.Namespace, base: TokenLimits) -> TokenLimits:
    """`base` with what the command line says instead (an option left out keeps its value)."""
    given = {
        name: getattr(args, name)
        for name in ("max_priority", "max_running", "max_queued")
        if hasattr(args, name)
    }
    if "max_priority" in given:
        given["max_priority"] = Priority(given["max_priority"])
    return dataclasses.replace(base, **given)


def _token_json(t: ApiToken) -> dict[str, Any]:
    return {
        "id": t.id,
        "name": t.name,
        "workspaces": None if t.workspaces is None else list(t.workspaces),
        "max_priority": t.limits.max_priority.value,
        "max_running": t.limits.max_running,
        "max_queued": t.limits.max_queued,
        "created_at": t.created_at.isoformat(),
        "last_used_at": t.last_used_at and t.last_used_at.isoformat(),
        "revoked_at": t.revoked_at and t.revoked_at.isoformat(),
    }


def _describe_limits(limits: TokenLimits) -> str:
    def count(n: int | None) -> str:
        return "no limit" if n is None else str(n)

    return (
        f"up to {limits.max_priority.value}, running {count(limits.max_running)}, "
        f"queued {count(limits.max_queued)}"
    )


async def _tokens(settings: Settings, args: argparse.Namespace, store_name: str) -> int:
    async with open_store(settings) as store:
        registry = TokenRegistry(store)
        if args.action != "list":  # a command that writes says where
            print(f"store: {store_name}", file=sys.stderr)
        if args.action == "create":
            scope = None if args.all_workspaces else args.workspaces
            record, token = await registry.create(args.name, scope, _limits(args, TokenLimits()))
            if args.json:
                print(json.dumps({**_token_json(record), "token": token}))
            else:
                print(token)
                print(
                    f"token {record.id} ({record.name}) created; it is shown only now",
                    file=sys.stderr,
                )
        elif args.action == "list":
            found = await registry.list()
            if args.json:
                print(json.dumps([_token_json(t) for t in found]))
            for t in [] if args.json else found:
                scope = "all workspaces" if t.workspaces is None else ",".join(t.workspaces)
                state = "revoked" if t.revoked_at else "active"
                print(
                    f"{t.id}  {state:7}  {t.name}  [{scope}]  created {t.created_at:%Y-%m-%d}"
                    f"  {_describe_limits(t.limits)}"
                )
        elif args.action == "update":
            known = {t.id: t for t in await registry.list()}
            if args.token_id not in known:
                print(f"wsrunner: no API token with id {args.token_id!r}", file=sys.stderr)
                return 2
            record = await registry.update(
                args.token_id, _limits(args, known[args.token_id].limits)
            )
            print(
                json.dumps(_token_json(record))
                if args.json
                else f"token {record.id} updated: {_describe_limits(record.limits)}"
            )
        else:
            record = await registry.revoke(args.token_id)
            print(json.dumps(_token_json(record)) if args.json else f"token {record.id} revoked")
    return 0


#: Collections of the middle generation between two full ones (Python's default: 10). A full
#: collection walks every live object while every stream waits, and a daemon serving a thousand
#: event streams keeps some 200,000 alive as long as their streams; with the default, the churn
#: of sending (objects that live just long enough to be promoted) starts one every few hundred
#: thousand allocations. Young collections run as often as before.
FULL_GC_EVERY: Final = 1000


async def _serve(settings: Settings) -> None:
    """Run the daemon; SIGTERM/SIGINT stop it gracefully, a second one stops it at once."""
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_GC_EVERY)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def run(*, task_status: trio.TaskStatus[Daemon]) -> None:
                await run_daemon(settings, task_status=task_status)
                nursery.cancel_scope.cancel()  # done: stop listening for signals

            daemon = await nursery.start(run)
            async for signum in signals:
                if not daemon.stopping.is_set():
                    logger.info(
                        "%s: stopping gracefully (send it again to stop now)",
                        signal.Signals(signum).name,
                    )
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


def _config_problems(exc: ConfigError) -> None:
    """Print a configuration error: each located problem of a file on a line of its own."""
    if isinstance(exc, SettingsError):
        for problem in exc.problems:
            print(problem, file=sys.stderr)
    else:
        print(f"wsrunner: invalid configuration: {exc}", file=sys.stderr)


def _config_check(args: argparse.Namespace) -> int:
    """`config check [FILE]`: the settings `serve` would use, or every problem found."""
    overrides: list[str] = []
    try:
        load_settings(args.file, overrides=overrides)
    except ConfigError as exc:
        _config_problems(exc)
        return 1
    for line in overrides:
        print(f"note: {line}", file=sys.stderr)
    path = settings_file(args.file)
    print(f"ok: {path}" if path else "ok: no settings file (environment only)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if argv[:1] == ["policy"] and "--" in argv:  # `policy test FILE -- git push -f`
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1 :]
    args = _parser().parse_args(argv)
    if args.command in ("submit", "tasks"):
        return console.run(args)  # a client of a daemon: no daemon settings needed
    if args.command == "tools":
        print(json.dumps({"tools": tools.definitions()}, indent=2))
        return 0
    if args.command == "policy":
        try:
            configured = policy_paths(load_settings(None, require_database=False))
        except ConfigError as exc:
            print(f"wsrunner: invalid configuration: {exc}", file=sys.stderr)
            return 2
        return policy_console.run(args, command, configured)
    if args.command == "config":
        return _config_check(args)
    if args.command == "provision":  # the default key prefix is the configured one
        try:
            prefix = load_settings(None, require_database=False).redis_prefix
        except ConfigError as exc:
            print(f"wsrunner: invalid configuration: {exc}", file=sys.stderr)
            return 2
        return provision.run(args, prefix)
    overrides: list[str] = []
    origins: dict[str, str] = {}
    try:
        settings = load_settings(args.config, overrides=overrides, origins=origins)
    except ConfigError as exc:
        _config_problems(exc)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    for line in overrides:  # a value set twice: say which one is used, and where it came from
        logger.warning("setting %s", line)
    if args.command == "tokens":
        try:
            return trio.run(_tokens, settings, args, describe_store(settings, origins))
        except (ValidationError, NotFoundError) as exc:
            print(f"wsrunner: {exc}", file=sys.stderr)
            return 2
        except UnavailableError as exc:
            print(f"wsrunner: {str(exc).splitlines()[0]}", file=sys.stderr)
            return 1
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
