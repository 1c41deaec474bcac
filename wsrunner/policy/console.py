"""`wsrunner policy`: check, test, explain and print the schema of command policies.

Modelled on `visudo -c`, `opa test` / `opa eval --explain` and `kyverno test`: `check` exits 1
with `file:line:col: path: message` lines (or GitHub annotations), `test` runs one command or a
file of expected decisions, `explain` shows every rule that matched and the one that decided.
Nothing here needs Redis, PostgreSQL or a running daemon.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from wsrunner.policy import Decision, EffectivePolicy, PolicyError, PolicySet, load_policy
from wsrunner.policy.loader import load_test_suite
from wsrunner.policy.schema import json_schema

_LOCATED = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+)(?::(?P<col>\d+))?: (?P<msg>.*)$")


def add_parser(sub: Any) -> None:
    policy = sub.add_parser(
        "policy",
        help="check, test and explain command policies",
        description="Validate policy files, try commands against them and explain decisions. "
        "Without FILE, the daemon's configured policy (POLICY_FILE, POLICY_DIR) is used.",
    )
    actions = policy.add_subparsers(dest="action", required=True)
    check = actions.add_parser(
        "check",
        help="validate files; exit 1 with located errors",
        description="Validate a base policy and its drop-ins: schema, "
        "duplicate keys, YAML surprises, duplicate rule ids.",
    )
    check.add_argument("files", nargs="*", metavar="FILE", help="base policy, then drop-ins")
    check.add_argument("--dropins", metavar="DIR", help="a policy.d directory to check too")
    check.add_argument("--format", choices=("text", "json", "github"), default="text")
    for name, text in (
        ("test", "decide commands: one after `--`, or a file of cases"),
        ("explain", "show every rule that matched a command, and the decision"),
    ):
        p = actions.add_parser(name, help=text, description=text)
        p.add_argument("files", nargs="*", metavar="FILE", help="base policy, then drop-ins")
        p.add_argument("--dropins", metavar="DIR", help="a policy.d directory to apply")
        p.add_argument("--workspace", default="default", help="workspace id (for overlays)")
        p.add_argument("--json", action="store_true", help="print JSON")
        if name == "test":
            p.add_argument(
                "--cases", metavar="FILE", help="a PolicyTest file of expected decisions"
            )
    actions.add_parser("schema", help="print the JSON Schema of policy files")


def run(args: argparse.Namespace, command: list[str], configured: tuple[Path, Path | None]) -> int:
    """Run `wsrunner policy ...`; `command` is what followed `--`."""
    if args.action == "schema":
        print(json.dumps(json_schema(), indent=2))
        return 0
    try:
        policies = _load(args, configured)
    except PolicyError as exc:
        _print_problems(exc.problems, getattr(args, "format", "text"))
        return 1
    if args.action == "check":
        docs = (policies.files.base, *policies.files.overlays)
        rules = sum(len(d.document.spec.rules) for d in docs)
        print(f"policy {policies.digest}: OK ({rules} rules; {', '.join(policies.sources)})")
        return 0
    if args.action == "test" and args.cases:
        return _run_cases(policies, Path(args.cases), json_out=args.json)
    if not command:
        print(
            f"wsrunner policy {args.action}: give a command after `--`, e.g. "
            f"`wsrunner policy {args.action} policy.yaml -- git status`",
            file=sys.stderr,
        )
        return 2
    text = command[0] if len(command) == 1 else " ".join(_quote(c) for c in command)
    effective = policies.for_workspace(args.workspace)
    decision = effective.evaluate(text)
    if args.json:
        print(json.dumps(_decision_json(text, effective, decision), indent=2))
    elif args.action == "test":
        print(_outcome(decision) + ("" if decision.allowed else f" ({_deciding(decision)})"))
    else:
        _print_explanation(text, effective, decision)
    return 0 if decision.allowed else 1


def _load(args: argparse.Namespace, configured: tuple[Path, Path | None]) -> PolicySet:
    if args.files:
        base, *overlays = args.files
        return load_policy(base, args.dropins, tuple(overlays))
    base_file, dropins = configured
    return load_policy(base_file, args.dropins or dropins)


def _quote(word: str) -> str:
    import shlex

    return shlex.quote(word)


def _outcome(decision: Decision) -> str:
    return "allow" if decision.allowed else "audit" if decision.runs else "deny"


def _deciding(decision: Decision) -> str:
    v = decision.denial
    return "" if v is None else f"rule {v.rule_id} at {v.source}: {v.message}"


def _print_problems(problems: list[str], fmt: str) -> None:
    if fmt == "json":
        out = []
        for p in problems:
            m = _LOCATED.match(p)
            out.append(
                {
                    "file": m["file"],
                    "line": int(m["line"]),
                    "column": int(m["col"] or 1),
                    "message": m["msg"],
                }
                if m
                else {"message": p}
            )
        print(json.dumps(out, indent=2))
        return
    for p in problems:
        m = _LOCATED.match(p) if fmt == "github" else None
        if m:
            print(f"::error file={m['file']},line={m['line']},col={m['col'] or 1}::{m['msg']}")
        else:
            print(p, file=sys.stdout if fmt == "github" else sys.stderr)


def _decision_json(text: str, policy: EffectivePolicy, decision: Decision) -> dict[str, Any]:
    return {
        "command": text,
        "workspace": policy.workspace,
        "decision": _outcome(decision),
        "mode": decision.mode,
        "policy": decision.digest,
        "sources": list(policy.sources),
        "commands": [
            {
                "argv": list(v.command.argv) if v.command else None,
                "via": v.command.via if v.command else None,
                "allowed": v.allowed,
                "rule": v.rule_id,
                "source": v.source,
                "message": v.message,
                "matched": list(v.considered),
            }
            for v in decision.verdicts
        ],
    }


def _print_explanation(text: str, policy: EffectivePolicy, decision: Decision) -> None:
    print(f"command:   {text}")
    print(f"workspace: {policy.workspace}  (policy {decision.digest}, mode {decision.mode})")
    print(f"files:     {', '.join(policy.sources)}")
    for v in decision.verdicts:
        what = " ".join(v.command.argv) if v.command else "(whole text)"
        via = f"  [run by {v.command.via}]" if v.command and v.command.via else ""
        print(f"  {'allow' if v.allowed else 'DENY '}  {what}{via}")
        print(f"         decided by {v.rule_id} ({v.source}): {v.message}")
        if len(v.considered) > 1:
            print(f"         rules that matched: {', '.join(v.considered)}")
    print(f"decision:  {_outcome(decision)}")


def _run_cases(policies: PolicySet, path: Path, *, json_out: bool) -> int:
    try:
        suite = load_test_suite(path).document
    except PolicyError as exc:
        _print_problems(exc.problems, "text")
        return 1
    results = []
    for i, case in enumerate(suite.cases, start=1):
        decision = policies.for_workspace(case.workspace).evaluate(case.command)
        got = _outcome(decision)
        rules = {v.rule_id for v in decision.verdicts if v.allowed == decision.allowed}
        ok = got == case.expect and (case.rule is None or case.rule in rules)
        results.append(
            {
                "case": case.name or f"case {i}",
                "command": case.command,
                "expected": case.expect,
                "got": got,
                "rules": sorted(rules),
                "expected_rule": case.rule,
                "passed": ok,
            }
        )
    failed = [r for r in results if not r["passed"]]
    if json_out:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            mark = "PASS" if r["passed"] else "FAIL"
            detail = (
                ""
                if r["passed"]
                else (
                    f": expected {r['expected']}"
                    + (f" by {r['expected_rule']}" if r["expected_rule"] else "")
                    + f", got {r['got']} by {', '.join(r['rules'])}"
                )
            )
            print(f"{mark}  {r['case']}  ({r['command']}){detail}")
        print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0
