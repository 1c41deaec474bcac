"""`wsrunner provision`: a password-protected account for wsrunner on Redis and on PostgreSQL,
and the credential file the systemd unit loads (`/etc/wsrunner/credentials/redis-url`,
`database-url`), written mode 0600.

The package never runs this by itself: a Redis or PostgreSQL server is the operator's, often
shared with other services, and nothing should change its accounts during `apt-get install`.

- `provision redis` creates an ACL user limited to wsrunner's key prefix (keys and pub/sub
  channels) and to the commands the daemon sends (`REDIS_COMMANDS`), with a random password.
  Only the SHA-256 of the password goes to Redis (`ACL SETUSER ... #<hash>`). It then saves the
  ACL (`ACL SAVE` with an aclfile, else `CONFIG REWRITE`), and warns when the `default` user
  still needs no password, since that user reaches every key.
- `provision postgres` creates a login role with a random password, stored as a SCRAM-SHA-256
  verifier computed here (the password itself never reaches the server, its logs or `ps`), and
  a database it owns, closed to other roles. The SQL goes to `psql` (as the `postgres` user
  through `runuser`, or `--admin-url`), or is printed with `--print-sql`. It warns about
  `pg_hba.conf` lines that let the role in without a password (`trust`).

This is an administration tool, not a daemon component: it uses the synchronous redis-py client
and the `psql` program, and runs no event loop.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import os
import re
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import redis
from redis.exceptions import RedisError, ResponseError

CREDENTIALS_DIR: Final = Path("/etc/wsrunner/credentials")

#: Every Redis command the daemon sends: directly, in MULTI/EXEC pipelines, and inside its Lua
#: scripts (Redis checks those against the user's ACL too). A new command in `queue.py` or
#: `resp.py` must be added here; tests/system/test_secured_backends.py reads those files to check.
REDIS_COMMANDS: Final = (
    "ping",
    "multi",
    "exec",
    "eval",
    "evalsha",  # health, transactions, scripts
    "get",
    "set",
    "del",
    "exists",
    "expire",
    "incr",  # results, heartbeats, claim ids
    "hset",
    "hget",
    "hgetall",
    "hdel",  # status hashes, in-flight claims
    "sadd",
    "srem",
    "smembers",  # active tasks, daemons
    "lpush",
    "rpush",
    "rpop",
    "llen",
    "blmove",  # queues, the idle wait
    "xadd",
    "xrange",
    "xread",  # event streams
    "publish",
    "subscribe",
    "unsubscribe",  # events and the cancel channel
    "decr",
    "hexists",
    "hincrby",
    "hlen",
    "hmget",
    "hsetnx",
    "hvals",
    "lrange",
    "ltrim",
    "pexpireat",
    "scard",
    "sismember",
    "time",
    "zadd",
    "zcard",
    "zcount",
    "zrange",
    "zrem",
    "zremrangebyscore",
    "zscore",
    "blpop",  # the turns: lines, held claims, homes, calls, the wake list (docs/scheduling.md)
)
#: Sent by redis-py on connect to Redis 7.2 and later; its failure is ignored, but a refusal
#: would fill `ACL LOG`, so it is allowed where it exists.
_OPTIONAL_COMMANDS: Final = ("client|setinfo",)

_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_PREFIX: Final = re.compile(r"[A-Za-z0-9_.:-]{1,100}")  # no glob characters: it becomes a pattern
_VERIFIER: Final = re.compile(
    r"SCRAM-SHA-256\$[0-9]+:[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+:[A-Za-z0-9+/=]+"
)
SCRAM_ITERATIONS: Final = 4096  # PostgreSQL's own default (scram_iterations)


class ProvisionError(Exception):
    """The account could not be made; the message says what to do."""


class UsageError(ProvisionError):
    """An argument is invalid; nothing was changed."""


def new_password() -> str:
    """256 random bits, URL-safe, so it can sit in a URL's user part unescaped."""
    return secrets.token_urlsafe(32)


# --- Redis -------------------------------------------------------------------------------------


def redis_acl_rules(
    prefix: str, password: str, *, db: int = 0, extra: tuple[str, ...] = ()
) -> list[str]:
    """The `ACL SETUSER` rules of wsrunner's user: everything reset, then its password (as a
    SHA-256), its keys and channels (`prefix:*`) and its commands, nothing else."""
    if not _PREFIX.fullmatch(prefix):
        raise UsageError(f"--prefix: expected letters, digits, '_', '.', ':', '-'; got {prefix!r}")
    commands = [*REDIS_COMMANDS, *extra, *(("select",) if db else ())]
    digest = hashlib.sha256(password.encode()).hexdigest()
    return [
        "reset",
        "on",
        f"#{digest}",
        f"~{prefix}:*",
        f"&{prefix}:*",
        "-@all",
        *(f"+{c}" for c in commands),
    ]


@dataclass(frozen=True, slots=True)
class Outcome:
    url: str  #: what the daemon connects with (holds the password)
    notes: list[str]  #: what was done, for the operator
    warnings: list[str]


def provision_redis(
    admin_url: str, *, user: str, prefix: str, host: str | None, save: bool, force: bool
) -> Outcome:
    """Create (or with `force`, reset) the ACL user `user` and return the daemon's URL."""
    if not _NAME.fullmatch(user) or user == "default":
        raise UsageError(
            f"--user: expected a name of letters, digits and '_' other than "
            f"'default' (every client's user); got {user!r}"
        )
    parts = urlsplit(admin_url)
    if parts.scheme not in ("redis", "rediss"):
        raise UsageError(f"--admin-url: expected redis:// or rediss://, got {parts.scheme!r}")
    if not _PREFIX.fullmatch(prefix):
        raise UsageError(f"--prefix: expected letters, digits, '_', '.', ':', '-'; got {prefix!r}")
    db = int(parts.path.strip("/") or 0)
    notes, warnings = [], []
    password = new_password()
    try:
        with redis.Redis.from_url(admin_url, decode_responses=True, socket_connect_timeout=5) as r:
            if not force and _call(r, "ACL", "GETUSER", user) is not None:
                raise ProvisionError(
                    f"Redis already has a user {user!r}: --force resets its rules "
                    "and password (restart wsrunner everywhere afterwards)"
                )
            version = tuple(int(n) for n in r.info("server")["redis_version"].split(".")[:2])
            extra = _OPTIONAL_COMMANDS if version >= (7, 2) else ()
            rules = redis_acl_rules(prefix, password, db=db, extra=extra)
            _call(r, "ACL", "SETUSER", user, *rules)
            notes.append(
                f"Redis user {user!r}: keys and channels {prefix}:*, {len(rules) - 6} commands"
            )
            warnings += _redis_default_user(r)
            if save:
                saved, message = _redis_save(r, user)
                (notes if saved else warnings).append(message)
            else:
                notes.append("not saved (--no-save): Redis forgets the user when it restarts")
    except ResponseError as exc:
        raise ProvisionError(
            f"Redis refused: {exc} (ACL needs Redis 6 or later and an admin "
            "account: --admin-url, or REDIS_ADMIN_URL)"
        ) from exc
    except RedisError as exc:
        raise ProvisionError(
            f"cannot use Redis at {parts.hostname}:{parts.port or 6379}: {exc}"
        ) from exc
    where = host or f"{parts.hostname or '127.0.0.1'}:{parts.port or 6379}"
    return Outcome(f"{parts.scheme}://{user}:{password}@{where}/{db}", notes, warnings)


def _call(r: redis.Redis, *args: str) -> Any:
    """One command on the admin connection (redis-py leaves `execute_command` untyped)."""
    return r.execute_command(*args)  # type: ignore[no-untyped-call]


def _redis_default_user(r: redis.Redis) -> list[str]:
    info = _call(r, "ACL", "GETUSER", "default")  # redis-py makes it a dict (None: no user)
    flags = info.get("flags", []) if info else []
    if "on" in flags and "nopass" in flags:
        return [
            "Redis's 'default' user needs no password and reaches every key: give it one "
            "(ACL SETUSER default on >PASSWORD, or requirepass) or turn it off (ACL SETUSER "
            "default off) once nothing else depends on it; see docs/operations.md"
        ]
    return []


def _redis_save(r: redis.Redis, user: str) -> tuple[bool, str]:
    """Persist the ACL: (True, where), or (False, a warning holding the user's ACL line)."""
    aclfile = (r.config_get("aclfile") or {}).get("aclfile", "")
    config_file = r.info("server").get("config_file", "")
    line = next((u for u in _call(r, "ACL", "LIST") if u.startswith(f"user {user} ")), "")
    try:
        if aclfile:
            _call(r, "ACL", "SAVE")
            return True, f"saved to {aclfile} (ACL SAVE)"
        if config_file:
            _call(r, "CONFIG", "REWRITE")
            return True, f"saved to {config_file} (CONFIG REWRITE)"
        why = "Redis runs without a config file"
    except ResponseError as exc:
        why = f"saving failed ({exc})"
    return False, (
        f"{why}: the user is lost when Redis restarts; add this line to its ACL file or "
        f"redis.conf (the password appears only as its SHA-256): {line}"
    )


# --- PostgreSQL --------------------------------------------------------------------------------


def scram_verifier(
    password: str, *, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS
) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (RFC 5802, RFC 7677), as
    libpq's PQencryptPasswordConn makes it: a role's password set this way never travels."""
    salt = secrets.token_bytes(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    salt_text, stored, server = (
        base64.b64encode(b).decode() for b in (salt, stored_key, server_key)
    )
    return f"SCRAM-SHA-256${iterations}:{salt_text}${stored}:{server}"


def postgres_script(role: str, database: str, verifier: str, *, force: bool) -> str:
    """The psql script that makes `role` (login, no other privilege, password `verifier`) and a
    database it owns that no other role may connect to; it stops at the first error."""
    for flag, name in (("--role", role), ("--database", database)):
        if not _NAME.fullmatch(name):
            raise UsageError(f"{flag}: expected letters, digits and '_'; got {name!r}")
    if not _VERIFIER.fullmatch(verifier):
        raise ProvisionError("internal: not a SCRAM-SHA-256 verifier")
    exists = (
        ""
        if force
        else f"  IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN\n"
        f"    RAISE EXCEPTION 'role \"{role}\" exists: --force gives it a new password';\n"
        "  END IF;\n"
    )
    return f"""\\set ON_ERROR_STOP on
-- Made by `wsrunner provision postgres`: role "{role}", database "{database}".
-- Every check comes first: when one fails, nothing has changed.
DO $$ BEGIN
{exists}  IF EXISTS (SELECT FROM pg_roles r WHERE rolname = '{role}' AND (rolsuper OR rolcreaterole
             OR rolcreatedb OR rolreplication OR rolbypassrls
             OR EXISTS (SELECT FROM pg_auth_members WHERE member = r.oid))) THEN
    RAISE EXCEPTION 'role "{role}" has administrative attributes or other roles: wsrunner needs a role of its own';
  END IF;
  IF EXISTS (SELECT FROM pg_database WHERE datname = '{database}'
             AND pg_get_userbyid(datdba) <> '{role}') THEN
    RAISE EXCEPTION 'database "{database}" exists and belongs to another role: give --database a new name, or ALTER DATABASE "{database}" OWNER TO "{role}"';
  END IF;
END $$;
BEGIN;
SELECT format('CREATE ROLE %I', '{role}')
    WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') \\gexec
-- The password as a SCRAM verifier: the password itself is never sent.
ALTER ROLE "{role}" WITH LOGIN PASSWORD '{verifier}';
COMMIT;
SELECT format('CREATE DATABASE %I OWNER %I', '{database}', '{role}')
    WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{database}') \\gexec
REVOKE ALL ON DATABASE "{database}" FROM PUBLIC;
DO $$ DECLARE r record; BEGIN
  FOR r IN SELECT line_number, type FROM pg_hba_file_rules
           WHERE auth_method = 'trust' AND error IS NULL
             AND ('all' = ANY(user_name) OR '{role}' = ANY(user_name))
             AND ('all' = ANY(database) OR '{database}' = ANY(database)) LOOP
    RAISE WARNING 'pg_hba.conf line % (%) accepts role "{role}" without a password (trust) for the connections it matches: put a scram-sha-256 line for it above', r.line_number, r.type;
  END LOOP;
EXCEPTION WHEN insufficient_privilege THEN
  RAISE NOTICE 'pg_hba_file_rules is not readable: check pg_hba.conf for trust lines yourself';
END $$;
"""


def psql_command(admin_url: str | None) -> list[str]:
    """How to run psql as an administrator: `admin_url` (its password from PGPASSWORD or
    ~/.pgpass, never the command line), or as the local `postgres` user when run as root."""
    flags = ["-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", "-"]
    if shutil.which("psql") is None:
        raise ProvisionError(
            "psql is not installed (apt-get install postgresql-client), or use "
            "--print-sql and run the SQL where it is"
        )
    if admin_url:
        return ["psql", "-d", admin_url, *flags]
    if os.geteuid() == 0 and shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--", "psql", "-d", "postgres", *flags]
    raise ProvisionError(
        "give --admin-url (a PostgreSQL superuser's URL), run as root on the "
        "database host, or use --print-sql"
    )


# --- credential files --------------------------------------------------------------------------


class CredentialFile:
    """The credential file `directory/name`, the only copy of a secret. `stage()` makes its
    temporary file (mode 0600 from its creation) before the account is touched, so that a
    directory that cannot take it stops the run while nothing has changed yet; `commit()`
    writes, syncs and renames it into place (a reader sees the old file or the new one)."""

    def __init__(self, directory: Path, name: str) -> None:
        self.path = directory / name
        self._temporary = directory / f".{name}.{secrets.token_hex(4)}"
        self._fd = -1

    def stage(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fd = os.open(self._temporary, flags, 0o600)

    def commit(self, text: str) -> None:
        try:
            os.write(self._fd, f"{text}\n".encode())
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            os.replace(self._temporary, self.path)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Close and remove the staged file (nothing, once it was committed)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._temporary.unlink(missing_ok=True)


# --- the command -------------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "provision",
        help="give wsrunner a password-protected Redis user or PostgreSQL role",
        description="Create wsrunner's own account on Redis (an ACL user limited to its keys "
        "and commands) or PostgreSQL (a role with a SCRAM-SHA-256 password and its own "
        "database), with a random password, and write the credential file the systemd unit "
        "loads (mode 0600). Restart wsrunner afterwards.",
    )
    kinds = p.add_subparsers(dest="backend", required=True)
    r = kinds.add_parser("redis", help="an ACL user for wsrunner's keys and commands")
    r.add_argument(
        "--admin-url",
        default=os.environ.get("REDIS_ADMIN_URL", "redis://127.0.0.1:6379/0"),
        help="an account that may run ACL SETUSER (default: $REDIS_ADMIN_URL, else "
        "redis://127.0.0.1:6379/0); its database is wsrunner's",
    )
    r.add_argument("--user", default="wsrunner", help="ACL user name (default: wsrunner)")
    r.add_argument(
        "--prefix", default=None, help="key prefix (default: the configured redis_prefix)"
    )
    r.add_argument(
        "--no-save",
        dest="save",
        action="store_false",
        help="do not persist the ACL (ACL SAVE / CONFIG REWRITE)",
    )
    pg = kinds.add_parser("postgres", help="a role with a SCRAM password and its own database")
    pg.add_argument(
        "--admin-url",
        default=None,
        help="a superuser's URL for psql, password in "
        "PGPASSWORD or ~/.pgpass (default: runuser -u postgres, as root)",
    )
    pg.add_argument("--role", default="wsrunner", help="role name (default: wsrunner)")
    pg.add_argument("--database", default="wsrunner", help="database name (default: wsrunner)")
    pg.add_argument("--sslmode", default=None, help="sslmode in the written URL (e.g. verify-full)")
    pg.add_argument(
        "--print-sql",
        action="store_true",
        help="print the SQL instead of running it (the credential is written still)",
    )
    for kind, port in ((r, 6379), (pg, 5432)):
        kind.add_argument(
            "--host",
            default=None,
            metavar="HOST[:PORT]",
            help=f"the address wsrunner connects to (default: the admin URL's, else "
            f"127.0.0.1:{port})",
        )
        kind.add_argument(
            "--credentials-dir",
            type=Path,
            default=CREDENTIALS_DIR,
            help=f"where the credential file goes (default: {CREDENTIALS_DIR})",
        )
        kind.add_argument(
            "--force",
            action="store_true",
            help="replace an existing account's password and credential file",
        )


def run(args: argparse.Namespace, redis_prefix: str) -> int:
    """Run `wsrunner provision ...`: 0 done, 1 the backend refused or failed, 2 a usage error."""
    name = "redis-url" if args.backend == "redis" else "database-url"
    target = args.credentials_dir / name
    if target.exists() and not args.force:
        print(
            f"wsrunner: {target} exists: --force makes a new password and replaces it "
            "(restart wsrunner on every host that uses it)",
            file=sys.stderr,
        )
        return 2
    credential = CredentialFile(args.credentials_dir, name)
    try:
        credential.stage()
    except OSError as exc:
        print(f"wsrunner: cannot write {target}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        if args.backend == "redis":
            outcome = provision_redis(
                args.admin_url,
                user=args.user,
                prefix=args.prefix or redis_prefix,
                host=args.host,
                save=args.save,
                force=args.force,
            )
        else:
            outcome = _provision_postgres(args)
    except ProvisionError as exc:
        credential.discard()
        print(f"wsrunner: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    except BaseException:
        credential.discard()
        raise
    credential.commit(outcome.url)
    for note in outcome.notes:
        print(f"wsrunner: {note}", file=sys.stderr)
    for warning in outcome.warnings:
        print(f"wsrunner: warning: {warning}", file=sys.stderr)
    print(f"wsrunner: wrote {target} (mode 0600); restart wsrunner to use it", file=sys.stderr)
    return 0


def _provision_postgres(args: argparse.Namespace) -> Outcome:
    password = new_password()
    script = postgres_script(args.role, args.database, scram_verifier(password), force=args.force)
    admin = urlsplit(args.admin_url) if args.admin_url else None
    where = args.host or (
        f"{admin.hostname}:{admin.port or 5432}" if admin and admin.hostname else "127.0.0.1:5432"
    )
    url = f"postgresql://{args.role}:{password}@{where}/{args.database}"
    if args.sslmode:
        url += f"?sslmode={args.sslmode}"
    if args.print_sql:
        print(script, end="")
        return Outcome(url, ["SQL printed: run it with psql as a superuser"], [])
    done = subprocess.run(
        psql_command(args.admin_url), input=script, text=True, capture_output=True, check=False
    )
    said = [
        line.split("WARNING:", 1)[1].strip()
        for line in done.stderr.splitlines()
        if "WARNING:" in line
    ]
    if done.returncode != 0:
        raise ProvisionError(f"psql failed: {done.stderr.strip() or done.returncode}")
    return Outcome(
        url,
        [
            f"PostgreSQL role {args.role!r} (SCRAM-SHA-256) owns database "
            f"{args.database!r}; other roles may not connect to it"
        ],
        said,
    )
