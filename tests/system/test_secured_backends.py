"""wsrunner on a Redis ACL user with a password and a PostgreSQL role with SCRAM-SHA-256, both
made by `wsrunner provision` and handed to the daemon as systemd credentials.

Runs against the machine's Redis (127.0.0.1:6379) and PostgreSQL (127.0.0.1:5432). Each test
makes an ACL user, a role and a database of its own with unique names and removes them after.
PostgreSQL's pg_hba.conf here trusts loopback; so that the role's password is really checked,
a `scram-sha-256` line for that role alone is put at the top of the file and the server
reloaded; the line is taken out again afterwards (the test is skipped where the file cannot be
written).
"""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
import redis
import trio
from psycopg import sql
from redis.exceptions import AuthenticationError, NoPermissionError

from tests.conftest import DATABASE_URL, REDIS_URL, free_port, traversable
from wsrunner.backends import provision

REPO = Path(__file__).resolve().parents[2]
ADMIN_PG = DATABASE_URL.rsplit("/", 1)[0] + "/postgres"
HBA_MARK = "# wsrunner-test-secured-backends"


def wsrunner(
    *args: str,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """The `wsrunner` command, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "wsrunner", *args],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def admin_pg() -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(ADMIN_PG, autocommit=True)


# --- fixtures ----------------------------------------------------------------------------------


@dataclass
class RedisAccount:
    user: str
    prefix: str
    url: str  #: as written to the credential file


@pytest.fixture(name="creds")
def _creds(tmp_path: Path) -> Path:
    return tmp_path / "credentials"


@pytest.fixture(name="redis_account")
def _redis_account(creds: Path, redis_client: redis.Redis) -> Iterator[RedisAccount]:
    tag = uuid.uuid4().hex[:10]
    user, prefix = f"wsrtest_{tag}", f"wsrtest-{tag}"
    try:
        done = wsrunner(
            "provision",
            "redis",
            "--admin-url",
            REDIS_URL,
            "--user",
            user,
            "--prefix",
            prefix,
            "--no-save",
            "--credentials-dir",
            str(creds),
        )
        assert done.returncode == 0, done.stderr
        url = (creds / "redis-url").read_text().strip()
        yield RedisAccount(user, prefix, url)
    finally:
        redis_client.execute_command("ACL", "DELUSER", user)
        keys = list(redis_client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            redis_client.unlink(*keys)


def _hba_file() -> Path:
    with admin_pg() as conn:
        row = conn.execute("SHOW hba_file").fetchone()
    assert row is not None
    return Path(str(row[0]))


def _reload_pg() -> None:
    with admin_pg() as conn:
        conn.execute("SELECT pg_reload_conf()")


def _drop_hba_lines(hba: Path, mark: str) -> None:
    kept = [line for line in hba.read_text().splitlines(keepends=True) if mark not in line]
    hba.write_text("".join(kept))


@pytest.fixture(name="scram_role")
def _scram_role() -> Iterator[str]:
    """A role name whose loopback connections must use scram-sha-256 (pg_hba.conf's first line)."""
    role = f"wsrtest_{uuid.uuid4().hex[:10]}"
    hba = _hba_file()
    if not os.access(hba, os.W_OK):
        pytest.skip(f"{hba} is not writable: the role's SCRAM login cannot be enforced here")
    mark = f"{HBA_MARK} {role}"
    original = hba.read_text()
    lines = (
        f"host all {role} 127.0.0.1/32 scram-sha-256 {mark}\n"
        f"host all {role} ::1/128 scram-sha-256 {mark}\n"
    )
    hba.write_text(lines + original)
    try:
        _reload_pg()
        yield role
    finally:
        _drop_hba_lines(hba, mark)
        _reload_pg()
        with admin_pg() as conn:
            for db in conn.execute(
                "SELECT datname FROM pg_database WHERE pg_get_userbyid(datdba) = %s", (role,)
            ).fetchall():
                conn.execute(
                    sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(str(db[0])))
                )
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def _wait_password_required(url: str) -> None:
    """pg_reload_conf() only signals the server: wait until a login without password fails."""
    no_password = re.sub(r"://([^:]+):[^@]+@", r"://\1@", url)
    deadline = time.monotonic() + 10
    while True:
        try:
            psycopg.connect(no_password, connect_timeout=5).close()
        except psycopg.OperationalError:
            return
        assert time.monotonic() < deadline, "pg_hba.conf's scram-sha-256 line never took effect"
        time.sleep(0.05)


@pytest.fixture(name="pg_url")
def _pg_url(creds: Path, scram_role: str) -> str:
    done = wsrunner(
        "provision",
        "postgres",
        "--admin-url",
        ADMIN_PG,
        "--role",
        scram_role,
        "--database",
        scram_role,
        "--credentials-dir",
        str(creds),
    )
    assert done.returncode == 0, done.stderr
    url = (creds / "database-url").read_text().strip()
    _wait_password_required(url)
    return url


# --- the ACL command list ----------------------------------------------------------------------


def test_every_redis_command_the_daemon_sends_is_in_the_acl_list() -> None:
    """A command added to the Redis adapter without adding it to the ACL would make a daemon on
    a provisioned Redis fail where the tests' default user has every command."""
    sent: set[str] = set()
    for module in ("queue.py", "resp.py", "turns.py"):
        text = (REPO / "wsrunner" / "backends" / "redis" / module).read_text()
        sent |= set(re.findall(r"redis\.call\('([A-Z]+)'", text))  # inside the Lua scripts
        sent |= set(re.findall(r"(?:execute|_cmd)\(\s*\"([A-Z]+)\"", text))
        sent |= set(re.findall(r"\[\s*\"([A-Z]{3,})\"", text))  # pipelines, MULTI/EXEC, AUTH
        if "pubsub(" in text:
            sent.add("SUBSCRIBE")
    assert {"RPOP", "XREAD", "BLMOVE", "EVALSHA", "MULTI", "HDEL"} <= sent  # the readers work
    always = {"AUTH"}  # every user may authenticate
    conditional = {"SELECT"}  # allowed when the URL names a database other than 0
    missing = sent - always - conditional - {c.upper() for c in provision.REDIS_COMMANDS}
    assert not missing, f"add to provision.REDIS_COMMANDS: {sorted(missing)}"


def test_the_scram_verifier_is_libpqs() -> None:
    with admin_pg() as conn:
        theirs = conn.pgconn.encrypt_password(b"a pass\xc3\xa9", b"r", b"scram-sha-256").decode()
    iterations, salt = re.fullmatch(r"SCRAM-SHA-256\$(\d+):([^$]+)\$.*", theirs).groups()  # type: ignore[union-attr]
    ours = provision.scram_verifier(
        "a passé", salt=base64.b64decode(salt), iterations=int(iterations)
    )
    assert ours == theirs


# --- Redis ---------------------------------------------------------------------------------------


def test_the_acl_user_reaches_only_its_prefix_and_its_commands(
    redis_account: RedisAccount, redis_client: redis.Redis, creds: Path
) -> None:
    assert stat.S_IMODE((creds / "redis-url").stat().st_mode) == 0o600
    user, prefix = redis_account.user, redis_account.prefix
    assert redis_account.url.startswith(f"redis://{user}:")
    outside = f"wsrtest-other-{uuid.uuid4().hex[:8]}"
    redis_client.set(f"{outside}:marker", "kept")
    try:
        with redis.Redis.from_url(redis_account.url, decode_responses=True) as r:
            r.set(f"{prefix}:k", "v")
            assert r.get(f"{prefix}:k") == "v"
            assert r.publish(f"{prefix}:cancel", "x") == 0
            for command in (
                ["FLUSHALL"],
                ["FLUSHDB"],
                ["CONFIG", "GET", "*"],
                ["KEYS", "*"],
                ["SCAN", "0"],
                ["ACL", "LIST"],
                ["SCRIPT", "FLUSH"],
                ["CLIENT", "LIST"],
                ["MODULE", "LIST"],
                ["SWAPDB", "0", "1"],
                ["MIGRATE", "h", "1", "k", "0", "1"],
                ["MONITOR"],
            ):
                with pytest.raises(NoPermissionError):
                    r.execute_command(*command)
            for key in (f"{outside}:marker", "workspace:tasks:normal", f"{prefix}x:k"):
                with pytest.raises(NoPermissionError):
                    r.get(key)
                with pytest.raises(NoPermissionError):
                    r.set(key, "taken")
            with pytest.raises(NoPermissionError):  # a script declaring a key outside
                r.eval("return redis.call('GET', KEYS[1])", 1, f"{outside}:marker")
            with pytest.raises(redis.ResponseError, match="can't access at least one of the keys"):
                r.eval(f"return redis.call('SET', '{outside}:marker', 'taken')", 0)
            with pytest.raises(redis.ResponseError, match="can't run this command"):
                r.eval("return redis.call('FLUSHALL')", 0)
            with pytest.raises(NoPermissionError):
                r.publish("workspace:cancel", "x")
            with pytest.raises(NoPermissionError):
                r.execute_command("SELECT", "1")
        wrong = re.sub(r":[^:@]+@", ":wrong@", redis_account.url)
        with pytest.raises(AuthenticationError), redis.Redis.from_url(wrong) as r:
            r.ping()
        assert redis_client.get(f"{outside}:marker") == "kept"
        # Redis holds the password's SHA-256, never the password.
        password = redis_account.url.split(":")[2].split("@")[0]
        line = next(u for u in redis_client.acl_list() if u.startswith(f"user {user} "))
        assert password not in line and "#" in line
    finally:
        redis_client.delete(f"{outside}:marker")


def test_provision_redis_refuses_what_it_must_not_touch(
    redis_account: RedisAccount, redis_client: redis.Redis, tmp_path: Path, creds: Path
) -> None:
    before = (creds / "redis-url").read_text()
    again = wsrunner(
        "provision",
        "redis",
        "--admin-url",
        REDIS_URL,
        "--user",
        redis_account.user,
        "--credentials-dir",
        str(creds),
    )
    assert again.returncode == 2 and "exists: --force" in again.stderr
    assert (creds / "redis-url").read_text() == before  # nothing changed
    elsewhere = wsrunner(
        "provision",
        "redis",
        "--admin-url",
        REDIS_URL,
        "--user",
        redis_account.user,
        "--credentials-dir",
        str(tmp_path / "other"),
    )
    assert elsewhere.returncode == 1 and "already has a user" in elsewhere.stderr
    default = wsrunner(
        "provision",
        "redis",
        "--admin-url",
        REDIS_URL,
        "--user",
        "default",
        "--force",
        "--credentials-dir",
        str(tmp_path / "d"),
    )
    assert default.returncode == 2 and "'default'" in default.stderr
    assert "nopass" in redis_client.acl_getuser("default")["flags"]  # the default user untouched
    # A credential file that cannot be written stops the run before the account is made.
    (tmp_path / "not-a-dir").write_text("")
    newcomer = f"{redis_account.user}_new"
    blocked = wsrunner(
        "provision",
        "redis",
        "--admin-url",
        REDIS_URL,
        "--user",
        newcomer,
        "--credentials-dir",
        str(tmp_path / "not-a-dir"),
    )
    assert blocked.returncode == 2 and "cannot write" in blocked.stderr
    assert redis_client.acl_getuser(newcomer) is None
    assert sorted(p.name for p in creds.iterdir()) == ["redis-url"]  # no staged file left
    with redis.Redis.from_url(before.strip()) as r:
        assert r.ping()  # the account still has its password
    # The shared Redis here lets anyone in as `default`: the tool says so.
    assert (
        "warning: Redis's 'default' user needs no password"
        in wsrunner(
            "provision",
            "redis",
            "--admin-url",
            REDIS_URL,
            "--user",
            redis_account.user,
            "--force",
            "--no-save",
            "--prefix",
            redis_account.prefix,
            "--credentials-dir",
            str(tmp_path / "f"),
        ).stderr
    )


# --- PostgreSQL --------------------------------------------------------------------------------


def test_the_role_logs_in_with_its_scram_password_only(
    pg_url: str, scram_role: str, creds: Path
) -> None:
    assert stat.S_IMODE((creds / "database-url").stat().st_mode) == 0o600
    password = pg_url.split(":")[2].split("@")[0]
    with psycopg.connect(pg_url) as conn:
        who = conn.execute("SELECT current_user, current_database()").fetchone()
        assert who == (scram_role, scram_role)
        conn.execute("CREATE TABLE t (x int)")  # it owns its database
    wrong = pg_url.replace(f":{password}@", ":not-it@")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong, connect_timeout=5)
    with admin_pg() as conn:
        row = conn.execute(
            "SELECT rolpassword, rolsuper, rolcreatedb, rolcreaterole FROM pg_authid"
            " WHERE rolname = %s",
            (scram_role,),
        ).fetchone()
        assert row is not None
        verifier, *powers = row
        assert str(verifier).startswith("SCRAM-SHA-256$4096:") and password not in str(verifier)
        assert powers == [False, False, False]
        acl = conn.execute(
            "SELECT datacl::text FROM pg_database WHERE datname = %s", (scram_role,)
        ).fetchone()
        assert acl is not None and "=c" not in str(acl[0]).replace(
            f"{scram_role}=", ""
        )  # no PUBLIC connect


def test_provision_postgres_prints_sql_and_refuses_other_owners(
    scram_role: str, tmp_path: Path
) -> None:
    printed = wsrunner(
        "provision",
        "postgres",
        "--print-sql",
        "--role",
        scram_role,
        "--database",
        scram_role,
        "--credentials-dir",
        str(tmp_path / "c"),
    )
    assert printed.returncode == 0, printed.stderr
    url = (tmp_path / "c" / "database-url").read_text().strip()
    password = url.split(":")[2].split("@")[0]
    assert password not in printed.stdout and "SCRAM-SHA-256$" in printed.stdout
    ran = subprocess.run(
        ["psql", "-d", ADMIN_PG, "-X", "-q", "-f", "-"],
        input=printed.stdout,
        capture_output=True,
        text=True,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    _wait_password_required(url)
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (scram_role,)

    def verifier() -> object:
        with admin_pg() as conn:
            row = conn.execute(
                "SELECT rolpassword FROM pg_authid WHERE rolname = %s", (scram_role,)
            ).fetchone()
        return row and row[0]

    before = verifier()
    for argv, said in (
        (["--role", scram_role, "--database", scram_role], "exists: --force"),
        (["--role", scram_role, "--database", "postgres", "--force"], "belongs to another role"),
        (["--role", "postgres", "--database", scram_role, "--force"], "administrative attributes"),
    ):
        done = wsrunner(
            "provision",
            "postgres",
            "--admin-url",
            ADMIN_PG,
            *argv,
            "--credentials-dir",
            str(tmp_path / uuid.uuid4().hex),
        )
        assert done.returncode == 1 and said in done.stderr, done.stderr
    assert verifier() == before  # a refusal changes nothing
    with admin_pg() as conn:
        assert conn.execute(
            "SELECT rolsuper FROM pg_roles WHERE rolname = 'postgres'"
        ).fetchone() == (True,)


# --- the daemon ----------------------------------------------------------------------------------


async def test_the_daemon_runs_a_task_on_the_secured_accounts(
    tmp_path: Path,
    creds: Path,
    redis_account: RedisAccount,
    pg_url: str,
    redis_client: redis.Redis,
) -> None:
    """The daemon as the package runs it: secrets only as credential files, no URL in its
    environment; a task goes from submit to completed through the ACL user and the role."""
    traversable(tmp_path)
    (creds / "internal-token").write_text("secured-internal-token")
    public = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("REDIS_URL", "DATABASE_URL", "WORKER_INTERNAL_TOKEN")
    }
    env.update(
        {
            "CREDENTIALS_DIRECTORY": str(creds),
            "WSRUNNER_REDIS_PREFIX": redis_account.prefix,
            "WORKSPACE_VOLUME_PATH": str(tmp_path / "volume"),
            "PUBLIC_API_HOST": "127.0.0.1",
            "PUBLIC_API_PORT": str(public),
            "WORKER_HEALTH_PORT": str(free_port()),
            "LOG_FORMAT": "text",
        }
    )
    made = wsrunner("tokens", "create", "--name", "secured", "--all-workspaces", "--json", env=env)
    assert made.returncode == 0, made.stderr
    bearer = json.loads(made.stdout)["token"]
    redis_client.execute_command("ACL", "LOG", "RESET")
    log = tmp_path / "daemon.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "wsrunner", "serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{public}", headers={"Authorization": f"Bearer {bearer}"}
        ) as c:
            deadline = time.monotonic() + 60
            while True:
                try:
                    r = await c.post(
                        "/api/tasks/submit",
                        json={
                            "workspace_id": "secured",
                            "steps": [
                                {"action": "execute_command", "command": "echo through-the-acl"}
                            ],
                        },
                    )
                    break
                except httpx.TransportError:
                    assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
                    assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
                    await trio.sleep(0.1)
            assert r.status_code == 202, r.text
            task = r.json()["task_id"]
            while (rec := (await c.get(f"/api/tasks/{task}")).json())["status"] in (
                "queued",
                "running",
            ):
                assert time.monotonic() < deadline, rec
                await trio.sleep(0.1)
            assert rec["status"] == "completed", rec
            assert rec["result"]["result"]["steps"][0]["result"]["stdout"] == "through-the-acl\n"
            events = (await c.get(f"/api/tasks/{task}/events")).text  # the stream, from Redis
            assert "completed" in events.rsplit("event: status_changed", 1)[-1]
            cancel = await c.post(f"/api/tasks/{task}/cancel")  # an ended task: 409, no denial
            assert cancel.status_code == 409
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    said = log.read_text(errors="replace")
    assert proc.returncode == 0, said[-3000:]
    # Nothing the daemon sent was refused: the ACL list is complete for this life cycle.
    denied = [e for e in redis_client.acl_log() if e.get("username") == redis_account.user]
    assert denied == [], denied
    # Its keys are under its prefix; its record is in its own database.
    assert redis_client.exists(f"{redis_account.prefix}:task:{task}:status")
    with psycopg.connect(pg_url) as conn:
        assert conn.execute(
            "SELECT status FROM task_executions WHERE id = %s", (task,)
        ).fetchone() == ("completed",)
