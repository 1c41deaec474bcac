"""Whose task runs next: one writer per workspace, and tenants taking turns.

The rules, which the Redis claim script (`backends/redis/turns.lua`) and `Turns` below both
follow, so every backend hands out work the same way:

1. **Priority first.** A runnable task of a higher priority always goes before any of a lower.
2. **Runnable.** A task may start when its workspace holds fewer claims than the workspace's
   limit (1 unless the settings allow more) and its tenant fewer than its token's
   `max_running`. A claim is held from the moment a daemon takes the task until it is settled
   (acknowledged at the task's end, given back, or dead-lettered), on any daemon.
3. **Turns.** Within a priority, tenants take turns: the one served least recently goes first,
   and a tenant whose first task arrives joins at the back of the line (no credit for idle
   time). Within a tenant, its workspaces take turns the same way; one workspace's tasks go
   oldest first. A task given back (a daemon stopping, a start that failed) goes first. So a tenant with a thousand queued tasks delays another tenant's task by at
   most one task per slot, whatever the thousand's workspaces.

A tenant is the public API token that submitted the task; a payload a producer pushed itself
(no token) belongs to its workspace's own tenant. Payloads whose workspace cannot be read go
first, to be dead-lettered by the daemon that takes them.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from wsrunner.models import PRIORITY_ORDER, Claim, Held, TurnsConfig, Waiting

#: what the claim script accepts as a workspace and a token id (the API refuses anything else)
_WORKSPACE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_TOKEN: Final = re.compile(r"[0-9a-f]{12}")


def tenant_of(obj: object) -> tuple[str, str, str] | None:
    """(tenant, workspace, task id) of a decoded payload; None if its workspace is unreadable."""
    if not isinstance(obj, dict):
        return None
    ws, token, task = obj.get("workspace_id"), obj.get("token_id"), obj.get("task_id")
    if not isinstance(ws, str) or not _WORKSPACE.fullmatch(ws):
        return None
    tenant = f"t:{token}" if isinstance(token, str) and _TOKEN.fullmatch(token) else f"w:{ws}"
    return tenant, ws, task if isinstance(task, str) else ""


@dataclass(frozen=True, slots=True)
class Taken:
    """A payload handed out, and what its claim holds until it is settled."""

    priority: str
    payload: str
    tenant: str = ""  #: "" for an unreadable payload, which holds nothing
    workspace: str = ""
    task_id: str = ""
    workspace_wait_s: float | None = None  #: how long its workspace had been found full


@dataclass(slots=True)
class _Level:
    """The waiting payloads of one priority."""

    unreadable: deque[str] = field(default_factory=deque)
    tenants: dict[str, int] = field(default_factory=dict)  #: tenant -> its place in line
    workspaces: dict[str, dict[str, int]] = field(default_factory=dict)  #: tenant -> ws -> place
    #: (tenant, workspace) -> its (task id, payload)s, the next on the left
    lists: dict[tuple[str, str], deque[tuple[str, str]]] = field(default_factory=dict)
    count: int = 0


class Turns:
    """The waiting payloads of every priority, and the claims held on workspaces and tenants.

    For the in-process queues (the embedded backend and the test fakes); Redis runs the same
    rules in its claim script.
    """

    def __init__(
        self, workspace_limit: int = 1, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self._levels = {p.value: _Level() for p in PRIORITY_ORDER}
        self._tick = 0  #: places at the back of a line count up from here ...
        self._front = 0  #: ... and places at its front down from here
        self.workspace_limit = workspace_limit  #: claims a workspace may hold, by default
        self.workspace_limits: dict[str, int] = {}  #: ... and where the settings allow more
        self.token_limits: dict[str, int] = {}  #: token id -> max_running
        self._held: dict[str, Taken] = {}  #: claim id -> what it holds
        self._on_workspace: dict[str, dict[str, str]] = {}  #: workspace -> claim id -> task id
        self._on_tenant: dict[str, set[str]] = {}
        self._blocked: dict[str, float] = {}  #: workspace -> when a take first found it full
        self._calls: dict[str, dict[str, float]] = {}  #: workspace -> API hold -> its end
        self._released: dict[str, None] = {}  #: claims released lately, which stay released

    def _next(self) -> int:
        self._tick += 1
        return self._tick

    def _first(self) -> int:
        self._front -= 1
        return self._front

    def add(self, priority: str, payload: str, *, next_up: bool = False) -> None:
        """Queue `payload` behind its workspace's others, its workspace and tenant keeping their
        places in line; or, with `next_up` (a task given back), before everything else."""
        level = self._levels[priority]
        try:
            found = tenant_of(json.loads(payload))
        except ValueError:
            found = None
        if found is None:
            level.unreadable.appendleft(payload) if next_up else level.unreadable.append(payload)
            return
        tenant, ws, task_id = found
        queue = level.lists.setdefault((tenant, ws), deque())
        item = (task_id, payload)
        queue.appendleft(item) if next_up else queue.append(item)
        spaces = level.workspaces.setdefault(tenant, {})
        if next_up:
            spaces[ws], level.tenants[tenant] = self._first(), self._first()
        else:
            spaces.setdefault(ws, self._next())
            level.tenants.setdefault(tenant, self._next())
        level.count += 1

    def __len__(self) -> int:
        return sum(self.depth(p) for p in self._levels)

    def depth(self, priority: str) -> int:
        level = self._levels[priority]
        return level.count + len(level.unreadable)

    def busy_workspace(self, workspace: str) -> str | None:
        """What holds `workspace` (a task id, or 'api' for an API call) when it may hold no
        more, else None."""
        held = self._on_workspace.get(workspace, {})
        now = self._clock()
        calls = {h: end for h, end in self._calls.get(workspace, {}).items() if end > now}
        if calls:
            self._calls[workspace] = calls
        else:
            self._calls.pop(workspace, None)
        limit = self.workspace_limits.get(workspace, self.workspace_limit)
        if len(held) + len(calls) < limit:
            return None
        return next(iter(held.values()), "api")

    def hold_call(self, workspace: str, hold_id: str, ttl_s: float) -> str | None:
        """Hold `workspace` for an API call that writes, for at most `ttl_s`; None when it
        holds it now, else what holds it."""
        holder = self.busy_workspace(workspace)
        if holder is None:
            self._calls.setdefault(workspace, {})[hold_id] = self._clock() + ttl_s
        return holder

    def release_call(self, workspace: str, hold_id: str) -> None:
        self._calls.get(workspace, {}).pop(hold_id, None)

    def tenant_full(self, tenant: str) -> int | None:
        """How many run, when `tenant` is at its token's limit; else None."""
        limit = self.token_limits.get(tenant[2:]) if tenant.startswith("t:") else None
        running = len(self._on_tenant.get(tenant, ()))
        return running if limit is not None and running >= limit else None

    def take(self, now: float | None = None) -> Taken | None:
        """The next payload by the rules, removed from the line; None if none may start.
        `now` (the clock's, by default) times how long a workspace stays full with tasks
        waiting."""
        if now is None:
            now = self._clock()
        for priority, level in self._levels.items():
            if level.unreadable:
                return Taken(priority, level.unreadable.popleft())
            for tenant in sorted(level.tenants, key=level.tenants.__getitem__):
                if self.tenant_full(tenant) is not None:
                    continue
                spaces = level.workspaces[tenant]
                for ws in sorted(spaces, key=spaces.__getitem__):
                    if self.busy_workspace(ws) is not None:
                        self._blocked.setdefault(ws, now)
                        continue
                    taken = self._pop(priority, level, tenant, ws)
                    since = self._blocked.pop(ws, None)
                    if since is None:
                        return taken
                    return dataclasses.replace(taken, workspace_wait_s=now - since)
        return None

    def _pop(self, priority: str, level: _Level, tenant: str, ws: str) -> Taken:
        queue = level.lists[(tenant, ws)]
        task_id, payload = queue.popleft()
        level.count -= 1
        spaces = level.workspaces[tenant]
        if queue:
            spaces[ws] = self._next()
        else:
            del level.lists[(tenant, ws)], spaces[ws]
        if spaces:
            level.tenants[tenant] = self._next()
        else:
            del level.workspaces[tenant], level.tenants[tenant]
        return Taken(priority, payload, tenant, ws, task_id)

    def claim(self, number: int, now: float | None = None) -> Claim | None:
        """`take(now)` as claim `<priority>:<number>`, holding what it needs until released."""
        taken = self.take(now)
        if taken is None:
            return None
        claim = Claim(
            f"{taken.priority}:{number}",
            taken.payload,
            taken.workspace_wait_s,
            workspace_id=taken.workspace or None,
        )
        self.hold(claim.claim_id, taken)
        return claim

    def hold(self, claim_id: str, taken: Taken) -> None:
        """Record that `claim_id` holds what `taken` needs, until `release(claim_id)`."""
        if not taken.workspace:
            return
        self._held[claim_id] = taken
        self._on_workspace.setdefault(taken.workspace, {})[claim_id] = taken.task_id
        self._on_tenant.setdefault(taken.tenant, set()).add(claim_id)

    def reassert(self, held: Held) -> None:
        """Hold again what a running task's claim holds, if it holds nothing now (the Redis
        half's repair after a data loss; here nothing is lost, so this is the same check)."""
        if held.claim_id in self._held:
            return
        tenant = f"t:{held.token_id}" if held.token_id else f"w:{held.workspace_id}"
        taken = Taken("", "", tenant, held.workspace_id, held.task_id)
        if held.claim_id not in self._released:
            self.hold(held.claim_id, taken)

    def release(self, claim_id: str) -> bool:
        """Free what `claim_id` held; False if it held nothing."""
        taken = self._held.pop(claim_id, None)
        if taken is None:
            return False
        self._released[claim_id] = None
        if len(self._released) > 10_000:  # (a bounded memory of them, oldest out)
            del self._released[next(iter(self._released))]
        on_ws = self._on_workspace[taken.workspace]
        del on_ws[claim_id]
        if not on_ws:
            del self._on_workspace[taken.workspace]
        on_tenant = self._on_tenant[taken.tenant]
        on_tenant.discard(claim_id)
        if not on_tenant:
            del self._on_tenant[taken.tenant]
        return True

    def counts(self) -> dict[str, int]:
        """Waiting payloads by what holds them back (`Waiting.kind`)."""
        out = {"workspace_busy": 0, "token_limit": 0, "no_free_slot": 0, "home_unavailable": 0}
        for level in self._levels.values():
            out["no_free_slot"] += len(level.unreadable)
            for (tenant, ws), queue in level.lists.items():
                if self.busy_workspace(ws) is not None:
                    out["workspace_busy"] += len(queue)
                elif self.tenant_full(tenant) is not None:
                    out["token_limit"] += len(queue)
                else:
                    out["no_free_slot"] += len(queue)
        return out

    def waiting(self, task_id: str) -> Waiting | None:
        """Where a waiting task stands and what holds it back; None if it is not waiting."""
        found = self.line(task_id)
        if found is None:
            return None
        position, tenant, ws = found
        return Waiting(
            position=position,
            workspace_holder=self.busy_workspace(ws),
            running=len(self._on_tenant.get(tenant, ())),
            token_limit=self.token_limits.get(tenant[2:]) if tenant.startswith("t:") else None,
        )

    def line(self, task_id: str) -> tuple[int, str, str] | None:
        """(place in line, tenant, workspace) of a waiting task (see `place`); None if it is
        not waiting here."""
        before = 0
        for level in self._levels.values():
            for (tenant, ws), queue in level.lists.items():
                index = next((i for i, (tid, _) in enumerate(queue) if tid == task_id), None)
                if index is not None:
                    line = [
                        (t, [(w, len(level.lists[(t, w)])) for w in _in_line(level.workspaces[t])])
                        for t in _in_line(level.tenants)
                    ]
                    at = place(line, tenant, ws, index)
                    return before + len(level.unreadable) + at, tenant, ws
            before += level.count + len(level.unreadable)
        return None


Line = list[tuple[str, list[tuple[str, int]]]]


def place(line: Line, tenant: str, workspace: str, index: int) -> int:
    """The place (1 = next) of item `index` (0 = oldest) of `workspace`'s list in one priority,
    if every workspace were free and nothing else arrived.

    `line` is that priority's tenants in line order, each with its workspaces in line order and
    how many wait in each. Taking turns keeps the cyclic order, so in round r every tenant still
    waiting gives one task: the item is its tenant's j-th, taken in round j, after j of each
    tenant before it in line and j - 1 of each after (fewer when they run out).
    """
    mine = [t for t, _ in line].index(tenant)
    totals = [sum(n for _, n in spaces) for _, spaces in line]
    return place_in(line[mine][1], workspace, index, totals[:mine], totals[mine + 1 :])


def place_in(
    spaces: list[tuple[str, int]], workspace: str, index: int, ahead: list[int], behind: list[int]
) -> int:
    """`place` from the tenant's own workspaces (in line order, with their lengths) and the
    totals of the tenants ahead of it and behind it in line."""
    k = [w for w, _ in spaces].index(workspace)
    j = sum(min(n, index + (1 if i <= k else 0)) for i, (_, n) in enumerate(spaces))
    return j + sum(min(t, j) for t in ahead) + sum(min(t, j - 1) for t in behind)


def _in_line(places: dict[str, int]) -> list[str]:
    return sorted(places, key=places.__getitem__)


class LocalTurns:
    """The `Turns` port over a `Turns` in this process: the embedded queue's and the test
    fake's. One daemon serves every workspace there, so nothing is placed."""

    _turns: Turns

    def _wake(self) -> None:
        """Tell an idle poller that work may be runnable now."""
        raise NotImplementedError

    async def _call(self) -> None:
        """What every call costs first (a fake's simulated round trip); nothing here."""

    async def configure(self, config: TurnsConfig) -> bool:
        """Limits only (one daemon serves every workspace here: nothing is placed)."""
        await self._call()
        self._turns.workspace_limit = config.workspace_limit
        self._turns.workspace_limits = dict(config.workspace_limits)
        for token, n in config.token_limits.items():
            if n is None:
                self._turns.token_limits.pop(token, None)
            else:
                self._turns.token_limits[token] = n
        self._wake()
        return False

    async def reassert(self, held: Sequence[Held]) -> None:
        await self._call()
        for h in held:
            self._turns.reassert(h)

    async def steps_over(self, claim_id: str) -> None:
        await self._call()
        if self._turns.release(claim_id):
            self._wake()

    async def hold_workspace(self, workspace_id: str, hold_id: str, ttl_s: float) -> str | None:
        await self._call()
        return self._turns.hold_call(workspace_id, hold_id, ttl_s)

    async def release_workspace(self, workspace_id: str, hold_id: str) -> None:
        await self._call()
        self._turns.release_call(workspace_id, hold_id)
        self._wake()

    async def waiting_counts(self) -> dict[str, int]:
        await self._call()
        return self._turns.counts()

    async def waiting(
        self, task_id: str, workspace_id: str, token_id: str | None, priority: str
    ) -> Waiting | None:
        await self._call()
        return self._turns.waiting(task_id)
