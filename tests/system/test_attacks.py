"""Attacks from the isolation review (issue 18), each written as the attacker would make it:
a tenant with a public token scoped to its own workspace, under the default policy and full
isolation, or a producer's payload carrying a tenant's environment variables.

Findings covered here: 1 (loader variables reach the root launch chain), 4 (commands inherit
the daemon's listening sockets), 9 (OLDPWD shows the daemon's directory; no seccomp filter).
Each asserts that nothing crossed: no marker written as root, no socket of the daemon's in the
command, no request of another client read, no syscall the filter denies.
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import trio

from tests.conftest import INTERNAL_TOKEN, raw_payload, submit_and_wait, wait_for
from wsrunner.daemon import Daemon
from wsrunner.errors import ValidationError
from wsrunner.payload import parse_task
from wsrunner.policy import bundled_policy

WS = "ws-attacker"


@dataclass
class Attacker:
    """The daemon (default policy, full isolation) and a public token scoped to WS."""

    daemon: Daemon
    public: str
    token: str

    @property
    def root(self) -> Path:
        return self.daemon.settings.volume_path / WS

    def client(self, token: str | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.public,
            timeout=90,
            headers={"Authorization": f"Bearer {token or self.token}"},
        )

    async def run(self, *steps: dict[str, Any]) -> dict[str, Any]:
        """Submit a task in WS through the public API, wait for its end; its record."""
        async with self.client() as c:
            return await submit_and_wait(c, WS, list(steps))


@pytest.fixture(name="attacker")
async def _attacker(start_daemon: Callable[..., Any], tmp_path: Path) -> Attacker:
    daemon: Daemon = await start_daemon(
        frontend="frontend",
        public_host="127.0.0.1",
        public_port=0,
        health_port=0,
        internal_token=INTERNAL_TOKEN,
        policy_file=bundled_policy(),
        policy_dir=tmp_path / "no-policy.d",
    )
    _, token = await daemon.service.tokens.create("attacker", [WS])
    return Attacker(daemon, daemon.urls[0], token)


def steps_of(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [s["result"] for s in record["result"]["result"]["steps"]]


# --- finding 1: a loader variable in a payload's env_vars runs tenant code as root ------------

AUDIT_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
/* rtld-audit(7): the loader calls this first, in every process started with LD_AUDIT set. */
unsigned int la_version(unsigned int version) {
    char path[4096];
    snprintf(path, sizeof path, "%s/marker-uid-%d", MARKERS, (int)getuid());
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0666);
    if (fd >= 0) { write(fd, "x\n", 2); close(fd); }
    return version;
}
"""


async def test_ld_audit_from_a_payload_never_runs_as_root(
    attacker: Attacker, redis_client: redis.Redis
) -> None:
    """The tenant builds an audit library in its workspace; a producer then queues a task of
    that workspace with `credentials.env_vars.LD_AUDIT` naming it (a tenant-chosen variable
    passed through). Nothing runs as root: the payload is refused at claim, naming the field."""
    if shutil.which("gcc") is None:  # commands see the host's /usr
        pytest.skip("no C compiler to build the audit library (the refusals are tested below)")
    markers = attacker.root / "markers"
    source = AUDIT_C.replace("MARKERS", json.dumps(str(markers)))
    built = await attacker.run(
        {"action": "write_file", "path": "audit.c", "content": source},
        {"action": "create_directory", "path": "markers"},
        {"action": "execute_command", "command": "gcc -shared -fPIC -o audit.so audit.c"},
    )
    assert built["status"] == "completed", steps_of(built)
    keys = attacker.daemon.service.queue.keys  # type: ignore[attr-defined]
    payload = raw_payload(
        workspace_id=WS,
        steps=[{"action": "execute_command", "command": "true"}],
        credentials={"env_vars": {"LD_AUDIT": str(attacker.root / "audit.so")}},
    )
    task_id = json.loads(payload)["task_id"]
    redis_client.lpush(keys.queue("normal"), payload)

    def ended() -> str | None:
        status = redis_client.hget(keys.status(task_id), "status")
        return status if status in ("completed", "failed") else None

    status = await wait_for(ended, timeout=60)
    found = sorted(p.name for p in markers.iterdir())
    assert "marker-uid-0" not in found, f"tenant code ran as root: {found}"
    dead = [json.loads(d) for d in redis_client.lrange(keys.dead, 0, -1)]
    reasons = [d["reason"] for d in dead if task_id in d["payload"]]
    assert status == "failed" and reasons, (status, found)
    assert "credentials.env_vars.LD_AUDIT" in reasons[0], reasons


#: Variables the loader, libc, a shell or git act on: none may come from a payload.
REFUSED = [
    "LD_AUDIT",
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "LD_DEBUG",
    "LD_BIND_NOW",
    "GCONV_PATH",
    "LOCPATH",
    "MALLOC_CHECK_",
    "MALLOC_ARENA_MAX",
    "BASH_ENV",
    "ENV",
    "GIT_SSH_COMMAND",
    "GIT_CONFIG_GLOBAL",
    "GIT_EXEC_PATH",
    "SSH_AUTH_SOCK",
    "SSH_ASKPASS",
]


@pytest.mark.parametrize("name", REFUSED)
def test_loader_shell_and_git_variables_are_refused_with_their_field(name: str) -> None:
    payload = json.loads(raw_payload(credentials={"env_vars": {"NODE_ENV": "test", name: "x"}}))
    with pytest.raises(ValidationError) as caught:
        parse_task(payload)
    assert caught.value.field == f"credentials.env_vars.{name}", str(caught.value)


def test_ordinary_variables_still_pass() -> None:
    env = {"NODE_ENV": "test", "API_BASE_URL": "https://example.com", "DEBUG": "1"}
    spec = parse_task(json.loads(raw_payload(credentials={"env_vars": env})))
    assert spec.credentials is not None and dict(spec.credentials.env_vars) == env


async def test_credentials_are_refused_over_the_public_api(attacker: Attacker) -> None:
    body = {
        "workspace_id": WS,
        "steps": [{"action": "execute_command", "command": "true"}],
        "credentials": {"env_vars": {"LD_AUDIT": "/tmp/x.so"}},
    }
    async with attacker.client() as c:
        r = await c.post("/api/tasks/submit", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"].startswith("credentials"), r.text


# --- finding 4: commands inherit the daemon's listening sockets -------------------------------

STEAL = r"""
import base64, json, os, select, socket, sys, time
listening, stolen, sockets = [], [], []
for name in os.listdir("/proc/self/fd"):
    try:
        target = os.readlink("/proc/self/fd/" + name)
    except OSError:
        continue
    if not target.startswith("socket:"):
        continue
    sockets.append(int(name))
    s = socket.socket(fileno=os.dup(int(name)))
    if s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        listening.append(int(name))
        s.setblocking(False)
    else:
        s.close()
print("ready", flush=True)
deadline = time.monotonic() + float(sys.argv[1])
while listening and time.monotonic() < deadline:
    ready, _, _ = select.select(listening, [], [], 0.2)
    for fd in ready:  # accept what arrives, read its request
        try:
            conn, _ = socket.socket(fileno=os.dup(fd)).accept()
        except OSError:
            continue
        conn.settimeout(1)
        try:
            stolen.append(base64.b64encode(conn.recv(65536)).decode())
        except OSError:
            pass
        conn.close()
print(json.dumps({"sockets": sockets, "listening": listening, "stolen": stolen}))
"""


async def test_a_command_finds_no_daemon_socket_to_accept_on(attacker: Attacker) -> None:
    """The tenant's command looks for inherited sockets and accepts on those that listen,
    while another client sends its token to both APIs: it finds none, reads nothing."""
    victim = f"victim-{secrets.token_hex(16)}"
    result: list[dict[str, Any]] = []

    async def attack() -> None:
        result.append(
            await attacker.run(
                {"action": "write_file", "path": "steal.py", "content": STEAL},
                {"action": "execute_command", "command": "python3 steal.py 6"},
            )
        )

    internal = attacker.daemon.urls[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(attack)
        await wait_for(lambda: (attacker.root / "steal.py").exists(), timeout=30)
        async with httpx.AsyncClient(timeout=3) as other:
            for _ in range(30):  # another tenant's and an orchestrator's requests
                for url, headers in (
                    (f"{attacker.public}/api/tasks", {"Authorization": f"Bearer {victim}"}),
                    (f"{internal}/health", {"X-Internal-Token": victim}),
                ):
                    try:
                        await other.get(url, headers={**headers, "Connection": "close"})
                    except httpx.TransportError:
                        pass  # taken by the command: what the assertions below look at
                await trio.sleep(0.1)
    step = steps_of(result[0])[1]
    lines = step["stdout"].splitlines()
    assert lines and lines[-1].startswith("{"), step
    found = json.loads(lines[-1])
    stolen = [base64.b64decode(s).decode(errors="replace") for s in found["stolen"]]
    assert found["sockets"] == [] and found["listening"] == [], found
    assert not any(victim in s for s in stolen), stolen


# --- finding 9: OLDPWD, and system calls a sandbox has no use for -----------------------------

SYSCALLS = r"""
import ctypes, json, os, struct
libc = ctypes.CDLL(None, use_errno=True)
def call(nr, *args):
    rc = libc.syscall(nr, *args)
    return {"rc": rc, "errno": ctypes.get_errno() if rc == -1 else 0}
params = ctypes.create_string_buffer(120)
attr = ctypes.create_string_buffer(128)
struct.pack_into("<IIQ", attr, 0, 1, 128, 0)  # PERF_TYPE_SOFTWARE, its size, the CPU clock
struct.pack_into("<Q", attr, 40, 1 << 5 | 1 << 6)  # exclude_kernel, exclude_hv
out = {
    "OLDPWD": os.environ.get("OLDPWD"),
    # add_key("user", ...) into the session keyring, keyctl(KEYCTL_GET_KEYRING_ID, session)
    "add_key": call(248, b"user", b"wsrunner-test", b"x", 1, ctypes.c_long(-3)),
    "keyctl": call(250, 0, ctypes.c_long(-3), 1),
    "io_uring_setup": call(425, 1, params),
    "userfaultfd": call(323, 1),  # UFFD_USER_MODE_ONLY: allowed to any user by the kernel
    "perf_event_open": call(298, attr, 0, -1, -1, 0),  # this process, software clock
    "unshare": call(272, 0x10000000),  # CLONE_NEWUSER
}
print(json.dumps(out))
"""
#: What the seccomp filter denies that the kernel lets an unprivileged process do here.
DENIED = ("add_key", "keyctl", "io_uring_setup", "userfaultfd", "perf_event_open", "unshare")


async def test_no_oldpwd_and_the_seccomp_filter_denies_what_a_sandbox_needs_not(
    attacker: Attacker,
) -> None:
    record = await attacker.run(
        {"action": "write_file", "path": "syscalls.py", "content": SYSCALLS},
        {"action": "execute_command", "command": "python3 syscalls.py"},
    )
    step = steps_of(record)[1]
    assert step.get("exit_code") == 0, step
    found = json.loads(step["stdout"].splitlines()[-1])
    allowed = {name: found[name] for name in DENIED if found[name]["rc"] != -1}
    assert (found["OLDPWD"], allowed) == (None, {}), (
        f"OLDPWD shows {found['OLDPWD']!r}; system calls the filter should deny succeeded: "
        f"{allowed}; all: {found}"
    )
