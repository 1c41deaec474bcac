"""The zipapp and the .deb, built for real, checked by lintian, installed into a scratch root,
run, upgraded and purged."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, traversable
from wsrunner import __version__

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, not the project's virtualenv

pytestmark = pytest.mark.skipif(
    shutil.which("dpkg-deb") is None or not Path(SYSTEM_PYTHON).exists(),
    reason="needs dpkg-deb and a system python3",
)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        ["bash", str(REPO / "packaging" / "build.sh"), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    pyz, deb = (Path(line) for line in done.stdout.split())
    return pyz, deb


@pytest.fixture(name="scratch")
def _scratch(tmp_path: Path, artifacts: tuple[Path, Path]) -> Path:
    """A root with an empty dpkg database and the package installed; scripts run chrootless."""
    root = tmp_path / "root"
    for d in ("var/lib/dpkg/updates", "var/lib/dpkg/info"):
        (root / d).mkdir(parents=True)
    (root / "var/lib/dpkg/status").touch()
    dpkg(root, "-i", str(artifacts[1]))
    return root


def dpkg(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [
            "dpkg",
            f"--root={root}",
            "--force-script-chrootless",
            "--force-depends",
            "--log=/dev/null",
            *args,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def run(
    binary: Path, *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SYSTEM_PYTHON, str(binary), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_the_deb_holds_what_it_should(artifacts: tuple[Path, Path]) -> None:
    _, deb = artifacts
    assert (
        deb.name
        == f"wsrunner_{__version__}_{subprocess.check_output(['dpkg', '--print-architecture'], text=True).strip()}.deb"
    )
    info = subprocess.run(
        ["dpkg-deb", "--field", str(deb), "Package", "Version", "Depends"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"Version: {__version__}" in info and "bubblewrap" in info
    minor = sys.version_info[1]  # the zipapp's compiled extensions are for this series only
    assert f"python3 (>= 3.{minor}), python3 (<< 3.{minor + 1})" in info, info
    listing = subprocess.run(
        ["dpkg-deb", "--contents", str(deb)], capture_output=True, text=True, check=True
    ).stdout
    paths = {line.split()[-1].lstrip(".") for line in listing.splitlines()}
    for want in (
        "/usr/bin/wsrunner",
        "/usr/lib/systemd/system/wsrunner.service",
        "/usr/lib/sysusers.d/wsrunner.conf",
        "/usr/lib/tmpfiles.d/wsrunner.conf",
        "/etc/wsrunner/wsrunner.conf",
        "/etc/wsrunner/policy.yaml",
        "/etc/wsrunner/policy.d/README",
        "/etc/default/wsrunner",
        "/usr/share/man/man1/wsrunner.1.gz",
        "/usr/share/doc/wsrunner/changelog.gz",
        "/usr/share/lintian/overrides/wsrunner",
    ):
        assert want in paths, want
    control = subprocess.run(
        ["dpkg-deb", "--info", str(deb), "conffiles"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert sorted(control) == sorted(
        [
            "/etc/wsrunner/wsrunner.conf",
            "/etc/wsrunner/policy.yaml",
            "/etc/wsrunner/policy.d/README",
            "/etc/default/wsrunner",
        ]
    )
    assert not any("/etc/systemd/system" in p or ".wants" in p for p in paths)  # enables nothing


def test_the_config_file_documents_every_setting() -> None:
    from dataclasses import fields

    from wsrunner.settings import Settings

    text = (REPO / "packaging" / "wsrunner.conf").read_text()
    for f in fields(Settings):
        key = "default_quota_gb" if f.name == "default_quota_bytes" else f.name
        assert f"\n#{key}:" in text, key


def test_install_run_and_purge(scratch: Path, tmp_path: Path) -> None:
    binary = scratch / "usr/bin/wsrunner"
    assert (scratch / "etc/passwd").read_text().count("wsrunner:x:") == 1
    token = scratch / "etc/wsrunner/credentials/internal-token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) >= 32
    assert stat.S_IMODE((scratch / "var/lib/wsrunner/workspaces").stat().st_mode) == 0o711
    base = {"PATH": os.environ["PATH"], "SHIV_ROOT": str(tmp_path / "shiv"), "HOME": str(tmp_path)}
    assert run(binary, "--version", env=base).stdout.strip() == f"wsrunner {__version__}"
    check = run(binary, "policy", "check", str(scratch / "etc/wsrunner/policy.yaml"), env=base)
    assert check.returncode == 0 and "OK" in check.stdout, check.stderr
    # A short life on the embedded backend (nothing else needed): serve, submit through the
    # public API, see it complete, stop.
    traversable(tmp_path)
    public = free_port()
    health = next(port for port in iter(free_port, None) if port != public)
    env = {
        **base,
        "STATE_DIRECTORY": str(tmp_path / "state"),
        "WORKSPACE_VOLUME_PATH": str(tmp_path / "workspaces"),
        "CREDENTIALS_DIRECTORY": str(token.parent),
        "POLICY_FILE": str(scratch / "etc/wsrunner/policy.yaml"),
        "PUBLIC_API_HOST": "127.0.0.1",
        "PUBLIC_API_PORT": str(public),
        "WORKER_HEALTH_PORT": str(health),
    }
    made = run(
        binary, "tokens", "create", "--name", "deb-test", "--all-workspaces", "--json", env=env
    )
    assert made.returncode == 0, made.stderr
    bearer = json.loads(made.stdout)["token"]
    log = tmp_path / "daemon.log"  # (a file, not a pipe nobody reads until the end)
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [SYSTEM_PYTHON, str(binary), "serve"], env=env, stdout=subprocess.DEVNULL, stderr=sink
        )
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{public}", headers={"Authorization": f"Bearer {bearer}"}
        ) as c:
            deadline = time.monotonic() + 60
            while True:
                try:
                    r = c.post(
                        "/api/tasks/submit",
                        json={
                            "workspace_id": "deb",
                            "steps": [
                                {"action": "execute_command", "command": "echo from-the-deb"}
                            ],
                        },
                    )
                    break
                except httpx.TransportError:
                    said = log.read_text(errors="replace")[-3000:]
                    assert proc.poll() is None, f"the packaged daemon exited: {said}"
                    assert time.monotonic() < deadline, f"the packaged daemon did not start: {said}"
                    time.sleep(0.2)
            assert r.status_code == 202, r.text
            task = r.json()["task_id"]
            while (rec := c.get(f"/api/tasks/{task}").json())["status"] in ("queued", "running"):
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert rec["status"] == "completed", rec
        assert rec["result"]["result"]["steps"][0]["result"]["stdout"] == "from-the-deb\n"
        # Its directory helper started from the zipapp too (else: worker threads, and a warning).
        children = [
            c
            for t in Path(f"/proc/{proc.pid}/task").iterdir()
            for c in (t / "children").read_text().split()
        ]
        cmdlines = [Path(f"/proc/{c}/cmdline").read_bytes().split(b"\0") for c in children]
        assert any(b"wsrunner.workspace.fshelper" in argv for argv in cmdlines), cmdlines
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert proc.returncode == 0
    # Purge: what the package made goes, the workspaces stay.
    (scratch / "var/lib/wsrunner/workspaces/ws-keep").mkdir()
    dpkg(scratch, "--purge", "wsrunner")
    assert not (scratch / "usr/bin/wsrunner").exists() and not (scratch / "etc/wsrunner").exists()
    assert (scratch / "var/lib/wsrunner/workspaces/ws-keep").is_dir()


def test_lintian_passes(artifacts: tuple[Path, Path]) -> None:
    """Debian's package checker finds no error or warning; each override says why it is right."""
    lintian = shutil.which("lintian")
    assert lintian, "lintian is not installed (bash scripts/system-packages.sh installs it)"
    done = subprocess.run(
        [lintian, "--fail-on", "error,warning", str(artifacts[1])],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, f"lintian:\n{done.stdout}{done.stderr}"
    lines = (REPO / "packaging/debian/lintian-overrides").read_text().splitlines()
    for before, line in zip(["", *lines], lines, strict=False):
        if line.startswith("wsrunner:"):
            assert before.startswith("#"), f"no comment says why: {line}"


def test_upgrade_removes_the_caches_of_other_builds(
    scratch: Path, artifacts: tuple[Path, Path], tmp_path: Path
) -> None:
    """shiv extracts each build into $SHIV_ROOT/wsrunner_<build id> and never removes one: an
    upgrade does, except the installed build's and one a running process still maps."""
    binary = scratch / "usr/bin/wsrunner"
    cache = scratch / "var/cache/wsrunner"
    env = {"PATH": os.environ["PATH"], "SHIV_ROOT": str(cache), "HOME": str(tmp_path)}
    assert run(binary, "--version", env=env).returncode == 0
    (current,) = (p for p in cache.iterdir() if p.is_dir())
    kept = current.stat().st_ino
    old, busy = (cache / f"wsrunner_{c * 64}" for c in "01")
    for build in (old, busy):
        (build / "site-packages").mkdir(parents=True)
        (build / "site-packages/_ext.so").write_bytes(b"\0" * 4096)
        (cache / f".{build.name}_lock").touch()
    (cache / f"{old.name}.tmp").mkdir()  # an extraction cut short
    # A process that maps a file of `busy`, as a daemon still running that build does.
    holder = subprocess.Popen(
        [
            SYSTEM_PYTHON,
            "-c",
            "import mmap, sys\n"
            "f = open(sys.argv[1], 'rb')\n"
            "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n"
            "print('mapped', flush=True)\nsys.stdin.read()",
            str(busy / "site-packages/_ext.so"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "mapped\n"
        said = dpkg(scratch, "-i", str(artifacts[1])).stdout
    finally:
        holder.communicate("")
    assert f"wsrunner: removed the extracted copy of 1 other build from {cache}" in said, said
    assert f"wsrunner: kept {busy}: a running process still uses it" in said, said
    assert "wsrunner: not restarting wsrunner.service: installed into DPKG_ROOT=" in said, said
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [current.name, f".{current.name}_lock", busy.name, f".{busy.name}_lock"]
    )
    assert current.stat().st_ino == kept  # not extracted again
    assert run(binary, "--version", env=env).stdout.strip() == f"wsrunner {__version__}"
    dpkg(scratch, "--verify", "wsrunner")  # the md5sums match what was installed


# systemctl's stand-in for the maintainer scripts' test below: it logs every call, and the
# unit is running when $FAKE/state says "active"; a restart gives it a new invocation id.
FAKE_SYSTEMCTL = """#!/bin/sh
echo "$*" >> "$FAKE/log"
state="$(cat "$FAKE/state")"
case "$1" in
    is-active) echo "$state"; [ "$state" = active ] ;;
    show) cat "$FAKE/invocation" ;;
    try-restart) if [ "$state" = active ]; then echo "$$" > "$FAKE/invocation"; fi ;;
esac
"""

# Installs the package for real (DPKG_ROOT empty), with systemd "running", in a mount namespace
# of its own where /etc, /usr and /var are overlays on a tmpfs: nothing reaches the host.
# Prints "=== STEP", what dpkg said, "--- systemctl" and the calls systemctl received.
IN_A_THROWAWAY_SYSTEM = r"""set -euo pipefail
deb="$1"
mount -t tmpfs tmpfs /run
for d in etc usr var; do
    mkdir -p "/run/layers/$d/upper" "/run/layers/$d/work"
    mount -t overlay overlay \
        -o "lowerdir=/$d,upperdir=/run/layers/$d/upper,workdir=/run/layers/$d/work" "/$d"
    [ "$(findmnt -n -o FSTYPE --mountpoint "/$d")" = overlay ]
done
mkdir -p /run/systemd/system /run/fake/bin
printf '%s' "$2" > /run/fake/bin/systemctl
chmod 0755 /run/fake/bin/systemctl
export FAKE=/run/fake PATH="/run/fake/bin:$PATH"
echo first > $FAKE/invocation
# Docker's images have one that forbids every start: the refused step below puts it back.
rm -f /usr/sbin/policy-rc.d
step() {
    echo "$2" > $FAKE/state
    echo "=== $1"
    shift 2
    dpkg --force-depends --no-triggers --log=/dev/null "$@" 2>&1 || echo "dpkg failed: $?"
    echo "--- systemctl"
    cat $FAKE/log 2>/dev/null || true
    : > $FAKE/log
}
step install inactive -i "$deb"
step upgrade-running active -i "$deb"
step upgrade-stopped failed -i "$deb"
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod 0755 /usr/sbin/policy-rc.d
step upgrade-refused active -i "$deb"
rm /usr/sbin/policy-rc.d
step remove active --remove wsrunner
"""


def test_maintainer_scripts_under_systemd(artifacts: tuple[Path, Path]) -> None:
    """A first install starts nothing; an upgrade restarts a running service (through
    deb-systemd-invoke), leaves a stopped one alone, obeys policy-rc.d, and says which in one
    line; only a removal stops it."""
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, check=False)
    if probe.returncode != 0 or shutil.which("deb-systemd-invoke") is None:
        pytest.skip("needs root's mount namespaces and deb-systemd-invoke")
    done = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "bash",
            "-c",
            IN_A_THROWAWAY_SYSTEM,
            "-",
            str(artifacts[1]),
            FAKE_SYSTEMCTL,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    steps: dict[str, tuple[str, list[str]]] = {}
    for chunk in done.stdout.split("=== ")[1:]:
        name, rest = chunk.split("\n", 1)
        said, log = rest.split("--- systemctl\n")
        assert "dpkg failed" not in said, said
        steps[name] = (said, log.splitlines())
    unit = "wsrunner.service"
    said, calls = steps["install"]
    assert calls == ["daemon-reload"], calls  # enables and starts nothing
    assert "wsrunner: " not in said, said
    said, calls = steps["upgrade-running"]
    assert f"wsrunner: restarted {unit}: upgraded from {__version__} to {__version__}" in said
    assert calls == [
        "daemon-reload",
        f"is-active {unit}",
        f"show --property=InvocationID --value {unit}",
        f"try-restart {unit}",
        f"show --property=InvocationID --value {unit}",
    ], calls
    said, calls = steps["upgrade-stopped"]
    assert f"wsrunner: not restarting {unit}: it is not running (failed)" in said, said
    assert calls == ["daemon-reload", f"is-active {unit}"], calls
    said, calls = steps["upgrade-refused"]
    assert f"wsrunner: not restarted {unit} (refused, see above): still running" in said, said
    assert f"try-restart {unit}" not in calls, calls
    said, calls = steps["remove"]
    assert f"stop {unit}" in calls and "daemon-reload" in calls, calls
