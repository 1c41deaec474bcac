"""Command policies: validation with positions, every rule kind, overlays, audit, reload, the CLI."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
import trio

from tests.conftest import (
    DATABASE_URL,
    REDIS_URL,
    cmd,
    exit_code,
    free_port,
    task_body,
    wait_for,
    wait_terminal,
)
from tests.system.test_cli import run_cli
from wsrunner.daemon import Daemon, reload_policy
from wsrunner.errors import PolicyDeniedError
from wsrunner.models import TaskState
from wsrunner.policy import PolicyError, bundled_policy, load_policy
from wsrunner.policy.schema import json_schema
from wsrunner.policy.shell import simple_commands

REPO = Path(__file__).resolve().parents[2]
HEADER = "apiVersion: wsrunner/v1\nkind: Policy\nmetadata:\n  name: t\n"


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def problems(path: Path, *more: Path) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_policy(path, None, more)
    return caught.value.problems


def base(tmp_path: Path, rules: str, extra: str = "", name: str = "base.yaml") -> Path:
    body = HEADER + "spec:\n" + textwrap.indent(textwrap.dedent(extra), "  ") + "  rules:\n"
    return write(tmp_path / name, body + textwrap.indent(textwrap.dedent(rules), "    "))


# --- validation ------------------------------------------------------------------------------


def test_schema_errors_name_file_line_column_and_path(tmp_path: Path) -> None:
    p = write(
        tmp_path / "p.yaml",
        """\
        apiVersion: wsrunner/v1
        kind: Policy
        metadata:
          name: p
        spec:
          mode: NO
          reson: typo
          limits:
            pids: "5"
            memory: lots
          rules:
            - id: a
              action: allow
              commands: [ls, true]
            - id: b
              action: allow
              pattern: 'x'
            - id: c
              action: deny
              commands: [rm]
              args: '(unclosed'
        """,
    )
    found = problems(p)
    expect = [
        f"{p}:6:9: spec.mode: Input should be 'enforce' or 'audit'",  # NO stays a string
        f"{p}:7:3: spec.reson: unknown key (not in the wsrunner/v1 schema)",
        f"{p}:9:11: spec.limits.pids: Input should be a valid integer",  # strict: no "5" -> 5
        f"{p}:10:13: spec.limits.memory: expected a size such as 512MiB, 2G or a number of bytes",
        f"{p}:14:22: spec.rules.0.commands.1: Input should be a valid string",
        f"{p}:15:7: spec.rules.1: a `pattern` rule can only deny; allow programs with `commands`",
        f"{p}:18:7: spec.rules.2: `args` is not a valid regular expression",
    ]
    assert len(found) == len(expect), found
    for got, want in zip(found, expect, strict=True):  # in file order
        assert got.startswith(want), (got, want)


def test_duplicate_keys_and_yaml_errors_are_located(tmp_path: Path) -> None:
    dup = write(tmp_path / "dup.yaml", HEADER + "spec:\n  mode: audit\n  mode: enforce\n")
    [msg] = problems(dup)
    assert msg.startswith(f"{dup}:7:3:") and 'duplicate key "mode"' in msg
    bad = write(tmp_path / "bad.yaml", HEADER + "spec: [unclosed\n")
    [msg] = problems(bad)
    assert msg.startswith(f"{bad}:") and msg.count(":") >= 3
    version = write(
        tmp_path / "v.yaml",
        "apiVersion: wsrunner/v2\nkind: Policy\nmetadata: {name: v}\nspec: {}\n",
    )
    assert problems(version) == [f"{version}:1:13: apiVersion: Input should be 'wsrunner/v1'"]


def test_shipped_policies_and_schema_are_valid_and_current() -> None:
    for name in ("default", "strict"):
        assert load_policy(bundled_policy(name)).for_workspace("w").rules
    committed = json.loads((REPO / "policies" / "policy-v1.schema.json").read_text())
    assert committed == json_schema(), (
        "run: wsrunner policy schema > policies/policy-v1.schema.json"
    )


# --- evaluation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "programs"),
    [
        ("ls -la | grep x && echo ok; true", ["ls", "grep", "echo", "true"]),
        ("FOO=1 BAR=2 make -j2 2>&1 >out.log", ["make"]),
        ('echo $(id -u) `whoami` "$(date)"', ["whoami", "id", "date", "echo"]),
        ('echo "\'" $(nc -l 1) "\'" $((1 + 2))', ["nc", "echo"]),
        ("sh -c 'curl x; nc -l 1'", ["sh", "curl", "nc"]),
        ('bash -lc "cat f | python3"', ["bash", "cat", "python3"]),
        ("env -u X A=1 timeout -s KILL 5 nice -n 3 rm f", ["env", "timeout", "nice", "rm"]),
        ("find . -name '*.py' -exec rm {} ';'", ["find", "rm"]),
        ("xargs -n1 -I{} cp {} /tmp < list", ["xargs", "cp"]),
        ("for f in a b; do cat $f; done", ["cat"]),
        ("if [ -e x ]; then exec sleep 1; fi", ["[", "exec", "sleep"]),
        ("diff <(sort a) <(sort b)", ["sort", "sort", "diff"]),
        # A here-document's body is data; substitutions in an unquoted one run (also after
        # blanks at the start of a line, where the grammar alone misses them).
        ("cat > notes.md <<EOF\nrun nc -l 1; rm -rf x\nEOF\n", ["cat"]),
        ("cat <<'EOF' >run.sh\n$(nc -l 1) `id`\nEOF\n", ["cat"]),
        ("cat <<EOF\n  $(nc -l 1)\n\t`id`\n${x:-$(date)}\nEOF\n", ["cat", "nc", "id", "date"]),
        ("cat <<-EOF\n\t$(nc)\n\tEOF\necho done", ["cat", "nc", "echo"]),
        ("sh <<'EOF'\nnc -l 1\nEOF\n", ["sh", "nc"]),
        ("bash <<< 'nc -l 1'", ["bash", "nc"]),
        # Substitutions anywhere.
        ("echo $((1+$(nc evil 80)))", ["echo", "nc"]),
        ('echo ${x:-$(nc)} "${y:-$(id)}"', ["echo", "nc", "id"]),
        ("echo > $(nc) 2>`id`", ["echo", "nc", "id"]),
        ("X=$(nc) a=(1 $(id) 2)", ["nc", "id"]),
        ("case $(nc) in a) ls;; esac", ["nc", "ls"]),
        ("for f in $(nc); do cat $f; done", ["nc", "cat"]),
        ("f() { rm -f x; }; f", ["rm", "f"]),
        ("[[ -n $(nc) ]]", ["[[", "nc"]),
        ("echo `echo \\`nc\\``", ["echo", "echo", "nc"]),
        # What a command runs.
        ("eval 'nc -l 1'; trap 'id' EXIT", ["eval", "nc", "trap", "id"]),
        ("env -S 'nc -l 1'", ["env", "nc"]),
        ("xargs -i nc ls", ["xargs", "nc"]),
        ("time -p make", ["make"]),
        ("echo &>/dev/null nc", ["echo", "nc"]),  # dash: `echo &` then `>/dev/null nc`
    ],
)
def test_every_program_of_a_line_is_found(line: str, programs: list[str]) -> None:
    assert sorted(c.program for c in simple_commands(line)) == sorted(programs)


@pytest.mark.parametrize(
    ("line", "argv"),
    [
        ("git >/dev/null push origin", ("git", "push", "origin")),
        ("git <<EOF push\nEOF\n", ("git", "push")),
        ("echo \"a b\" 'c' $'d\\te' x\\ y", ("echo", "a b", "c", "d\te", "x y")),
    ],
)
def test_words_are_read_as_the_shell_reads_them(line: str, argv: tuple[str, ...]) -> None:
    assert simple_commands(line)[0].argv == argv


def test_rule_kinds_and_precedence(tmp_path: Path) -> None:
    p = (
        base(
            tmp_path,
            """\
        - {id: tools, action: allow, commands: [ls, git, "python3.*", sh]}
        - {id: no-push, action: deny, commands: [git], args: '(^| )push( |$)'}
        - {id: no-secrets, action: deny, pattern: '\\.env\\b'}
        """,
        ).parent
        / "base.yaml"
    )
    policy = load_policy(p).for_workspace("w")

    def verdict(line: str) -> tuple[bool, str]:
        d = policy.evaluate(line)
        return d.allowed, (d.denial.rule_id if d.denial else d.verdicts[0].rule_id)

    assert verdict("git status") == (True, "tools")
    assert verdict("python3.11 -V") == (True, "tools")  # a glob in `commands`
    assert verdict("git push origin") == (False, "no-push")  # an explicit deny beats the allow
    assert verdict("ls; git push") == (False, "no-push")
    assert verdict("cat .env") == (False, "no-secrets")  # text rules see the whole line
    assert verdict("cat f") == (False, "default-deny")
    assert verdict("/usr/bin/git status") == (False, "builtin:path")
    assert verdict("./ls") == (False, "builtin:path")
    assert verdict("$TOOL x") == (False, "builtin:dynamic")
    assert verdict("sh -c 'ls; cat x'") == (False, "default-deny")
    assert verdict("ls 'unclosed") == (False, "builtin:syntax")
    assert verdict("   ") == (False, "builtin:empty")
    d = policy.evaluate("git push")
    assert d.as_error()["source"] == f"{p}:8" and d.as_error()["policy"] == d.digest
    # Decided once per command text, then remembered: the same answers a second time.
    for line in ("git status", "git push origin", "cat .env", "$TOOL x", "   "):
        assert policy.evaluate(line) is policy.evaluate(line)
    assert verdict("git push origin") == (False, "no-push") and verdict("ls") == (True, "tools")
    # A reloaded (or another workspace's) policy decides afresh.
    assert load_policy(p).for_workspace("w").evaluate("ls") is not policy.evaluate("ls")


def test_overlays_apply_in_order_to_matching_workspaces(tmp_path: Path) -> None:
    b = base(
        tmp_path,
        "- {id: git, action: allow, commands: [git]}",
        extra="sandbox: {network: none}\nlimits: {memory: 1GiB}\n",
    )
    d = tmp_path / "policy.d"
    d.mkdir()
    write(
        d / "10-all.yaml",
        """\
        apiVersion: wsrunner/v1
        kind: PolicyOverlay
        metadata: {name: all}
        spec:
          limits: {memory: 2GiB, pids: 64}
          rules:
            - {id: make, action: allow, commands: [make]}
        """,
    )
    write(
        d / "20-acme.yaml",
        """\
        apiVersion: wsrunner/v1
        kind: PolicyOverlay
        metadata: {name: acme, workspaces: ["acme-*"]}
        spec:
          mode: audit
          sandbox: {network: host}
          limits: {memory: 3GiB}
          rules:
            - {id: acme-no-make, action: deny, commands: [make]}
        """,
    )
    write(d / "README.txt", "not a policy")
    policies = load_policy(b, d)
    other, acme = policies.for_workspace("team-b"), policies.for_workspace("acme-web")
    assert other.limits.memory_bytes == 2 * 1024**3 and acme.limits.memory_bytes == 3 * 1024**3
    assert other.limits.pids == acme.limits.pids == 64
    assert (other.sandbox.network, acme.sandbox.network) == ("none", "host")
    assert other.evaluate("make").allowed and not acme.evaluate("make").allowed
    audit = acme.evaluate("make")
    assert audit.mode == "audit" and audit.runs and audit.denial.rule_id == "acme-no-make"
    assert other.sources == (str(b), str(d / "10-all.yaml"))
    write(
        d / "30-dup.yaml",
        """\
        apiVersion: wsrunner/v1
        kind: Policy
        metadata: {name: dup}
        spec:
          rules:
            - {id: make, action: allow, commands: [make]}
        """,
    )
    with pytest.raises(PolicyError) as caught:
        load_policy(b, d)
    found = caught.value.problems
    assert any("30-dup.yaml:2:1: kind: a drop-in must be a PolicyOverlay" in p for p in found)
    assert any(
        "30-dup.yaml:6:1: spec.rules.0.id: rule id 'make' is already defined at "
        f"{d / '10-all.yaml'}:7" in p
        for p in found
    )


# --- what the reader refuses ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "rule", "message"),
    [
        ("ls 'unclosed", "builtin:syntax", 'unexpected "\'unclosed" at 1:4'),
        ("echo ok\nif true; then", "builtin:syntax", "missing 'fi' at 2:14"),
        ("sh -c 'ls )'", "builtin:syntax", "unexpected ')' at 1:4 of the script run by sh"),
        (
            "cat <<EOF\nunterminated\n",
            "builtin:syntax",
            "missing the line ending the here-document",
        ),
        # A here-document whose end bash finds elsewhere than the grammar: its lines would be
        # read as commands by one and as text by the other.
        ("cat <<EOF\n EOF\necho '\nEOF\nnc evil\n'", "builtin:syntax", "here-document at 2:2"),
        ("cat <<EOF\nx\nEOF\r\nnc\n", "builtin:syntax", "here-document at 3:1"),
        ("cat <<EOF\nx \\\nEOF\necho '\nEOF\nnc\n'", "builtin:syntax", "continues onto the"),
        # bash joins a word across a backslash-newline, the grammar splits it (`lsof`, not `ls`);
        # at the start of a line, the grammar joins the line to the one before (`ls nc`).
        ("ls\\\nof", "builtin:syntax", "line continuation"),
        ("ls\n\\\nnc", "builtin:syntax", "continuation (backslash at the end of a line) at 2:1"),
        # Bash syntax that dash, the usual /bin/sh, reads as commands.
        ("((nc))", "builtin:syntax", "(( ... ))"),
        ("[[ -n x || nc ]]", "builtin:syntax", "inside [[ ]]"),
        ("echo $'\\' ; nc ; #'", "builtin:syntax", "a quote inside $'...'"),
        # Caps: never a RecursionError, never an unbounded wait.
        ("env " * 3000 + "true", "builtin:nesting", "nested too deep"),
        ("$(" * 3000 + "ls" + ")" * 3000, "builtin:nesting", "nested too deep"),
        ("x" * 65_537, "builtin:length", "65537 characters"),
        ("ls|" * 16_000 + "ls '", "builtin:complexity", "16000 pipes"),
        ("cat <<EOF\n" + "$a " * 2_000 + "\nEOF\n", "builtin:complexity", "2000 $ and `"),
        ("(x)" * 21_000 + '"', "builtin:complexity", "CPU time"),  # the parser recovers slowly
        (")" * 65_000, "builtin:syntax", "at 1:1"),  # stopped at the first error
    ],
)
def test_what_the_reader_cannot_read_is_denied(line: str, rule: str, message: str) -> None:
    decision = load_policy(bundled_policy("default")).for_workspace("w").evaluate(line)
    assert not decision.allowed and decision.denial is not None
    assert (decision.denial.rule_id, message in decision.denial.message) == (rule, True), (
        decision.denial.message[:300]
    )


def test_every_program_bash_and_dash_run_is_named(tmp_path: Path) -> None:
    """The reader against the shells themselves: each line runs in bash and in dash with a PATH
    of logging stand-ins; every program that ran must be one the reader named (or it refused)."""
    stubs, log = tmp_path / "bin", tmp_path / "log"
    stubs.mkdir()
    for name in ("nc", "id", "date"):
        (stubs / name).write_text(f'#!/bin/sh\necho {name} >> "$LOG"\n')
        (stubs / name).chmod(0o755)
    lines = [
        "echo $((1+$(nc)))",
        "echo ${x:-$(nc)}",
        'echo "${x:-"$(nc)"}"',
        "echo ${a[$(nc)]}",
        "cat <<EOF\n  $(nc)\nEOF",
        "cat <<EOF\n\t`nc`\nEOF",
        "cat <<EOF\n$$(nc)\nEOF",
        "cat <<EOF\n\\\\$(nc)\nEOF",
        "cat <<-EOF\n\t$(nc)\n\tEOF",
        "cat <<EOF\n$(echo ')'; nc)\nEOF",
        "cat <<'EOF'\n$(nc)\nEOF\nid",
        "cat <<E\\OF\nEOF\nnc\nE\\OF\n",
        "echo `echo \\`nc\\``",
        "echo $(echo ')'; nc)",
        "x=(1 $(nc)); case $(id) in *) date;; esac",
        "f() { nc; }",
        "[[ -n $(nc) ]]",
        "echo >$(nc)",
        ": <<< $(nc)",
        "echo a#$(nc)",
        "!(nc)",
        "coproc { nc; }",
        "sh <<'EOF'\nnc\nEOF",
        "bash -c 'nc'",
        "env -S 'nc x'",
        "trap nc EXIT",
        "eval nc",
        "echo &>/dev/null nc",
        "echo $((1) ; nc ; (2))",
        'echo "$(echo ")"; nc)"',
        "time nc",
        "xargs -i nc id </dev/null",
        "find /dev/null -exec nc {} \\;",
    ]
    shells = [s for s in ("/bin/bash", "/bin/dash") if Path(s).exists()]
    assert shells
    for line in lines:
        try:
            named = {c.program for c in simple_commands(line)}
        except Exception:  # refused: the policy denies the line (ShellSyntaxError)
            continue
        for shell in shells:
            log.write_text("")
            subprocess.run(
                [shell, "-c", line],
                cwd=tmp_path,
                env={"PATH": str(stubs), "LOG": str(log)},
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=10,
            )
            ran = set(log.read_text().split())
            assert ran <= named, (shell, line, ran, named)


# --- in the daemon ---------------------------------------------------------------------------


def _policy_dir(tmp_path: Path, mode: str) -> Path:
    d = tmp_path / "etc"
    d.mkdir(exist_ok=True)
    write(
        d / "policy.yaml",
        (REPO / "policies" / "default.yaml")
        .read_text()
        .replace("  mode: enforce", f"  mode: {mode}"),
    )
    return d


async def test_a_denied_command_fails_its_step_with_the_rule(daemon: Daemon) -> None:
    sub = await daemon.service.submit(
        task_body(cmd("echo before"), cmd("nc -l 9"), cmd("echo after"))
    )
    rec = await wait_terminal(daemon, sub.record.id)
    steps = [s["result"] for s in rec.result["result"]["steps"]]
    assert rec.status is TaskState.FAILED and steps[0]["stdout"] == "before\n"
    denied = steps[1]["policy_denied"]
    assert denied["rule"] == "default-deny" and denied["error"] == "policy_denied"
    assert "'nc' is not allowed" in steps[1]["error"] and "exit_code" not in steps[1]
    assert steps[2]["stdout"] == "after\n"  # the task goes on (stop_on_error is off)
    scrape = daemon.metrics.render().decode()
    assert 'wsrunner_policy_denials_total{mode="enforce",rule="default-deny"} 1.0' in scrape


async def test_the_event_loop_runs_while_a_long_command_is_judged(daemon: Daemon) -> None:
    """Reading and judging 60 KB of commands is CPU work for a worker thread: the daemon's other
    tasks keep running meanwhile (progress is counted, not timed)."""
    line = "ls;" * 20_000 + "nc -l 9"  # 20,001 commands; the last one is denied, nothing runs
    ticks: list[int] = []
    judged = trio.Event()

    async def tick() -> None:
        while not judged.is_set():
            ticks.append(0)
            await trio.lowlevel.checkpoint()

    async def call() -> None:
        start = len(ticks)
        with pytest.raises(PolicyDeniedError) as denied:
            await daemon.service.workspace.exec("ws-1", line)
        ticks_while_judging.append(len(ticks) - start)
        judged.set()
        assert denied.value.details["rule"] == "default-deny"

    ticks_while_judging: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tick)
        await trio.lowlevel.checkpoint()
        nursery.start_soon(call)
    assert ticks_while_judging[0] > 10, ticks_while_judging


async def test_audit_mode_runs_the_command_and_logs_the_denial(
    start_daemon, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = _policy_dir(tmp_path, "audit")
    daemon = await start_daemon(policy_file=d / "policy.yaml")
    with caplog.at_level(logging.WARNING, logger="wsrunner.execution.steps"):
        sub = await daemon.service.submit(task_body(cmd("seq 2")))
        rec = await wait_terminal(daemon, sub.record.id)
    assert rec.status is TaskState.COMPLETED
    assert rec.result["result"]["steps"][0]["result"]["stdout"] == "1\n2\n"
    [line] = [r for r in caplog.records if "would deny" in r.getMessage()]
    assert line.rule == "default-deny" and line.task_id == sub.record.id
    assert 'mode="audit",rule="default-deny"} 1.0' in daemon.metrics.render().decode()


async def test_reload_keeps_the_old_policy_when_the_new_one_is_invalid(
    start_daemon, tmp_path: Path
) -> None:
    d = _policy_dir(tmp_path, "enforce")
    daemon = await start_daemon(policy_file=d / "policy.yaml")
    first = daemon.policy.current.digest
    # A task that starts now keeps this policy, whatever happens to the files meanwhile.
    slow = await daemon.service.submit(task_body(cmd("sleep 1.5"), cmd("printf kept")))
    await wait_for(lambda: slow.record.id in daemon.runner.running)
    (d / "policy.d").mkdir()
    write(
        d / "policy.d" / "50-printf.yaml",
        """\
        apiVersion: wsrunner/v1
        kind: PolicyOverlay
        metadata: {name: printf}
        spec:
          rules:
            - {id: no-printf, action: deny, commands: [printf]}
        """,
    )
    assert await reload_policy(daemon.policy, daemon.metrics)
    assert daemon.policy.current.digest != first
    rec = await wait_terminal(daemon, slow.record.id)
    assert rec.result["result"]["steps"][1]["result"]["stdout"] == "kept"
    new = await daemon.service.submit(task_body(cmd("printf new")))
    rec = await wait_terminal(daemon, new.record.id)
    assert rec.result["result"]["steps"][0]["result"]["policy_denied"]["rule"] == "no-printf"
    # An invalid edit: refused, the policy in force stays, the failure is visible.
    good = daemon.policy.current.digest
    write(
        d / "policy.d" / "60-broken.yaml",
        "apiVersion: wsrunner/v1\nkind: PolicyOverlay\n"
        "metadata: {name: b}\nspec: {rules: [{id: X}]}\n",
    )
    assert not await reload_policy(daemon.policy, daemon.metrics)
    assert daemon.policy.current.digest == good
    scrape = daemon.metrics.render().decode()
    assert "wsrunner_policy_last_reload_successful 0.0" in scrape
    assert "wsrunner_policy_reload_failures_total 1.0" in scrape


async def test_sighup_reloads_a_running_daemon(tmp_path: Path, prefix: str, schema: str) -> None:
    d = _policy_dir(tmp_path, "enforce")
    port, public = free_port(), free_port()
    env = {
        **os.environ,
        "REDIS_URL": REDIS_URL,
        "DATABASE_URL": DATABASE_URL,
        "WSRUNNER_REDIS_PREFIX": prefix,
        "WSRUNNER_DATABASE_SCHEMA": schema,
        "WORKSPACE_VOLUME_PATH": str(tmp_path / "v"),
        "WORKER_HEALTH_PORT": str(port),
        "WORKER_INTERNAL_TOKEN": "t",
        "PUBLIC_API_HOST": "127.0.0.1",
        "PUBLIC_API_PORT": str(public),
        "POLICY_FILE": str(d / "policy.yaml"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "wsrunner", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:

            async def gauge(name: str) -> str | None:
                try:
                    text = (await client.get("/metrics")).text
                except httpx.TransportError:
                    return None
                return next(
                    (ln.split()[-1] for ln in text.splitlines() if ln.startswith(name)), None
                )

            async def reloaded(expected: str) -> bool:
                return await gauge("wsrunner_policy_last_reload_successful") == expected

            await wait_for(lambda: gauge("wsrunner_policy_info"), timeout=30, poll=0.1)
            write(d / "policy.yaml", "not: [valid")
            proc.send_signal(signal.SIGHUP)
            await wait_for(lambda: reloaded("0.0"))
            write(d / "policy.yaml", (REPO / "policies" / "strict.yaml").read_text())
            proc.send_signal(signal.SIGHUP)
            await wait_for(lambda: reloaded("1.0"))
        proc.send_signal(signal.SIGTERM)
        status = await exit_code(proc)
        log = proc.stderr.read().decode() if proc.stderr else ""
        assert "policy reload failed" in log and "policy reloaded" in log
        assert status == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# --- the CLI ---------------------------------------------------------------------------------


def test_cli_check(tmp_path: Path) -> None:
    ok = run_cli(
        "policy",
        "check",
        str(REPO / "policies" / "default.yaml"),
        str(REPO / "policies" / "examples" / "50-acme-node.yaml"),
        env={},
    )
    assert ok.returncode == 0 and ok.stdout.startswith("policy ") and "OK (30 rules" in ok.stdout
    bad = write(tmp_path / "bad.yaml", HEADER + "spec:\n  rules:\n    - {id: a, action: allow}\n")
    text = run_cli("policy", "check", str(bad), env={})
    assert text.returncode == 1
    assert text.stderr.strip() == f"{bad}:7:7: spec.rules.0: a rule needs `commands` or `pattern`"
    gh = run_cli("policy", "check", "--format", "github", str(bad), env={})
    assert gh.stdout.strip() == (
        f"::error file={bad},line=7,col=7::spec.rules.0: a rule needs `commands` or `pattern`"
    )
    js = json.loads(run_cli("policy", "check", "--format", "json", str(bad), env={}).stdout)
    assert js == [
        {
            "file": str(bad),
            "line": 7,
            "column": 7,
            "message": "spec.rules.0: a rule needs `commands` or `pattern`",
        }
    ]


def test_cli_test_and_explain() -> None:
    strict = str(REPO / "policies" / "strict.yaml")
    denied = run_cli("policy", "test", strict, "--", "git", "push", "-f", "origin", "main", env={})
    assert denied.returncode == 1 and denied.stdout.startswith("deny (rule no-force-push at ")
    allowed = run_cli("policy", "test", strict, "--", "git status", env={})
    assert allowed.returncode == 0 and allowed.stdout.strip() == "allow"
    # Without a file: the configured policy (POLICY_FILE), here the default one.
    configured = run_cli("policy", "test", "--", "sudo ls", env={})
    assert configured.returncode == 1 and "seed-sudo" in configured.stdout
    explained = run_cli("policy", "explain", "--", "ls | sh -c 'grep x; nc -l 1'", env={})
    lines = explained.stdout.splitlines()
    assert explained.returncode == 1 and lines[-1] == "decision:  deny"
    assert any(ln.strip() == "DENY   nc -l 1  [run by sh -c]" for ln in lines), lines
    assert any("decided by files-and-text" in ln for ln in lines)
    js = json.loads(
        run_cli("policy", "explain", "--json", strict, "--", "git status", env={}).stdout
    )
    assert js["decision"] == "allow" and js["commands"][0]["matched"] == ["git"]


def test_cli_test_cases(tmp_path: Path) -> None:
    args = (
        "policy",
        "test",
        str(REPO / "policies" / "default.yaml"),
        str(REPO / "policies" / "examples" / "50-acme-node.yaml"),
        "--cases",
    )
    ok = run_cli(*args, str(REPO / "policies" / "examples" / "default-cases.yaml"), env={})
    assert ok.returncode == 0, ok.stdout
    assert ok.stdout.splitlines()[-1] == "31 passed, 0 failed"
    wrong = write(
        tmp_path / "cases.yaml",
        """\
        apiVersion: wsrunner/v1
        kind: PolicyTest
        cases:
          - {name: right, command: ls, expect: allow}
          - {name: wrong rule, command: sudo ls, expect: deny, rule: default-deny}
          - {name: wrong outcome, command: nc, expect: allow}
        """,
    )
    out = run_cli(*args, str(wrong), env={})
    assert out.returncode == 1
    assert out.stdout.splitlines() == [
        "PASS  right  (ls)",
        "FAIL  wrong rule  (sudo ls): expected deny by default-deny, got deny by seed-sudo",
        "FAIL  wrong outcome  (nc): expected allow, got deny by default-deny",
        "1 passed, 2 failed",
    ]


def test_the_readme_policy_example_is_valid(tmp_path: Path) -> None:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Command policy and sandbox") :]
    block = section[
        section.index("```yaml\n") + 8 : section.index("```\n", section.index("```yaml"))
    ]
    policy = load_policy(write(tmp_path / "readme.yaml", block)).for_workspace("w")
    assert policy.limits.cpus == 2 and policy.sandbox.read_only_paths == ("/opt/node",)
    assert not policy.evaluate("git push --force origin main").allowed
    assert policy.evaluate("git push origin main").allowed


#: Crashed tree-sitter-bash 0.25.1 (a read out of bounds; exit 139): found by the OpenAPI fuzzing
#: of the internal exec, minimized to `{` then a character of plane 15.
CRASHERS = ["echo a{\U000f769d", "\u00af.\u00cd\x1f\U000af1e7{\U000f7c35\u0084-V", "a{\U000dffff"]


def test_text_that_crashed_the_shell_parser_is_refused_and_the_process_lives() -> None:
    """In a child process: on the old code the first of these killed it with SIGSEGV (and so
    the daemon, since the policy reads every command in its own process)."""
    probe = textwrap.dedent(
        """
        import sys
        from wsrunner.policy.shell import simple_commands
        for line in sys.argv[1:]:
            try:
                simple_commands(line)
            except Exception as exc:
                print(type(exc).__name__, exc)
        print("alive")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, *CRASHERS], capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[-1] == "alive" and len(lines) == len(CRASHERS) + 1, done.stdout
    assert all(line.startswith("UnreadableCharacterError") for line in lines[:-1]), lines
    assert "U+40000" in lines[0]
    # The planes a shell command does use still read: Latin, CJK, emoji, CJK extension B.
    assert simple_commands("echo é 中 \U0001f600 \U00020000")
