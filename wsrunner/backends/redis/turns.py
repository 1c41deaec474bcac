"""The claim rules of `wsrunner.turns` as Lua, so that each claim stays one atomic step in Redis.

Producers still `LPUSH` onto `<prefix>:tasks:<priority>` (the reference system's lists, the
"ingress"). A claim first moves what arrived there into the line of its priority, by tenant
and workspace, then takes the next runnable payload. Keys, under `<prefix>:turns:`:

- `<p>:line`                 ZSET tenant -> its place in line (the tick it joined or was served)
- `<p>:t:<tenant>`           ZSET workspace -> its place in the tenant's line
- `<p>:q:<tenant>:<ws>`      LIST of payloads: LPUSH to join, RPOP to take
- `<p>:unreadable`           LIST of payloads with no readable workspace (taken first)
- `<p>:count`                payloads in the lines (the depth is this, ingress and unreadable)
- `tick`, `front`            the counters that order the lines (back: tick; front: -front)
- `held`                     HASH claim id -> "<workspace>\\t<tenant>\\t<task id>"
- `ws:<ws>`                  HASH claim id -> task id: the claims a workspace holds
- `tenant:<tenant>`          SET of claim ids a tenant holds
- `limits:ws`                HASH workspace -> claims it may hold ('*': the default)
- `limits:token`             HASH token id -> max_running
- `calls:<ws>`               ZSET API call -> when its hold ends (ms): internal API and tool
                             calls that write hold the workspace too (`HOLD`)
- `homes`                    HASH workspace -> its home host (whose volume holds it)
- `host:<host>`              STRING, the host's lease: 'shared' or 'local' (its volume), with
                             the daemons' lease TTL, renewed by every daemon of the host
- `wake`                     LIST: each release pushes one entry (at most 64 kept); an idle
                             daemon's wait pops one and claims again
- `blocked`                  HASH workspace -> when (ms) a claim first found it full with
                             tasks waiting; read and cleared when one of them is taken

Every script that settles a claim (ack, give back, dead-letter, the transition that acks)
releases what it held in the same step. The scripts touch keys they compute from the prefix,
which a single Redis allows (Redis Cluster would not).
"""

from __future__ import annotations

from typing import Final

#: Functions the scripts below share; each script starts with them.
LIB: Final = r"""
local function tk(P, ...) return P .. ':turns:' .. table.concat({...}, ':') end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)  -- ms

local function route(P, p, raw, next_up)
  local ok, obj = pcall(cjson.decode, raw)
  local ws, tenant
  if ok and type(obj) == 'table' then
    ws = obj['workspace_id']
    if type(ws) ~= 'string' or #ws > 128 or not string.find(ws, '^[%w][%w_.-]*$') then
      ws = nil
    else
      local tok = obj['token_id']
      if type(tok) == 'string' and #tok == 12 and string.find(tok, '^[0-9a-f]+$') then
        tenant = 't:' .. tok
      else
        tenant = 'w:' .. ws
      end
    end
  end
  if not ws then
    local u = tk(P, p, 'unreadable')
    if next_up then redis.call('RPUSH', u, raw) else redis.call('LPUSH', u, raw) end
    return
  end
  local q = tk(P, p, 'q', tenant, ws)
  if next_up then redis.call('RPUSH', q, raw) else redis.call('LPUSH', q, raw) end
  local spaces, line = tk(P, p, 't', tenant), tk(P, p, 'line')
  if next_up then  -- a task given back goes first
    redis.call('ZADD', spaces, -redis.call('INCR', tk(P, 'front')), ws)
    redis.call('ZADD', line, -redis.call('INCR', tk(P, 'front')), tenant)
  else  -- a newcomer joins at the back; one already in line keeps its place
    if not redis.call('ZSCORE', spaces, ws) then
      redis.call('ZADD', spaces, redis.call('INCR', tk(P, 'tick')), ws)
    end
    if not redis.call('ZSCORE', line, tenant) then
      redis.call('ZADD', line, redis.call('INCR', tk(P, 'tick')), tenant)
    end
  end
  redis.call('INCR', tk(P, p, 'count'))
end

local function ingest(P, priorities)
  for _, p in ipairs(priorities) do
    local ingress = P .. ':tasks:' .. p
    for _ = 1, 1000 do
      local raw = redis.call('RPOP', ingress)
      if not raw then break end
      route(P, p, raw, false)
    end
  end
end

local function release(P, claim)
  local info = redis.call('HGET', tk(P, 'held'), claim)
  if not info then return end
  redis.call('LPUSH', tk(P, 'wake'), '1')  -- an idle daemon's watcher pops it and claims
  redis.call('LTRIM', tk(P, 'wake'), 0, 63)
  local ws, tenant = string.match(info, '^([^\t]*)\t([^\t]*)\t')
  redis.call('HDEL', tk(P, 'ws', ws), claim)
  redis.call('SREM', tk(P, 'tenant', tenant), claim)
  redis.call('HDEL', tk(P, 'held'), claim)
end

-- The end of a claim (acknowledged, given back, dead-lettered): its payload, or nil.
local function settle(P, inflight, claim)
  local payload = redis.call('HGET', inflight, claim)
  redis.call('HDEL', inflight, claim)
  release(P, claim)
  return payload
end

local function ws_limit(P, ws)
  local own = redis.call('HMGET', tk(P, 'limits', 'ws'), ws, '*')
  return tonumber(own[1] or own[2] or 1)
end

-- API calls that write hold a workspace as a claim does, until they end or their time runs out.
local function calls(P, ws)
  return redis.call('ZCOUNT', tk(P, 'calls', ws), now, '+inf')
end

local function ws_busy(P, ws)
  return redis.call('HLEN', tk(P, 'ws', ws)) + calls(P, ws) >= ws_limit(P, ws)
end

local function tenant_limit(P, tenant)
  if string.sub(tenant, 1, 2) ~= 't:' then return nil end
  local limit = redis.call('HGET', tk(P, 'limits', 'token'), string.sub(tenant, 3))
  if not limit then return nil end  -- a missing field is false in Lua, not nil
  return tonumber(limit)
end

local function tenant_full(P, tenant)
  local limit = tenant_limit(P, tenant)
  return limit ~= nil and redis.call('SCARD', tk(P, 'tenant', tenant)) >= limit
end
"""

# ARGV: prefix, in-flight hash, this host, its volume ('shared' or 'local'), what to do with a
# workspace whose home host is gone ('fail' or 'wait'), the priorities highest first.
# Returns {claim id, payload, ms the workspace was found full before (-1: never), placement}:
# placement is '' (ran here before, or shared), 'new' (first use: this host is its home now),
# 'moved:<host>' (taken over from a host that is gone, shared volumes), or 'gone:<host>' (its
# home host is gone and its volume is not here: the daemon fails the task, saying so).
CLAIM: Final = (
    LIB
    + r"""
local P, inflight, host, volume, on_gone = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local priorities = {unpack(ARGV, 6)}
ingest(P, priorities)

-- Whether this host may run `ws` now, and how: nil (not here), or a placement as above.
local function placed(ws)
  if host == '' then return '' end  -- a client that serves no volume (set_placement not called)
  local home = redis.call('HGET', tk(P, 'homes'), ws)
  if not home then return 'new' end
  if home == host then return '' end
  local lease = redis.call('GET', tk(P, 'host', home))
  if lease then  -- its home runs: here too only when both share the volume
    if lease == 'shared' and volume == 'shared' then return '' end
    return nil
  end
  if volume == 'shared' and redis.call('SISMEMBER', tk(P, 'shared'), home) == 1 then
    return 'moved:' .. home
  end
  if on_gone == 'fail' then return 'gone:' .. home end
  return nil
end
local function hand(p, raw, tenant, ws, placement)
  if placement == 'new' or string.sub(placement or '', 1, 6) == 'moved:' then
    redis.call('HSET', tk(P, 'homes'), ws, host)
  end
  local claim = p .. ':' .. redis.call('INCR', P .. ':claim_seq')
  redis.call('HSET', inflight, claim, raw)
  local waited = -1
  if ws then
    local since = redis.call('HGET', tk(P, 'blocked'), ws)
    if since then
      waited = now - tonumber(since)
      redis.call('HDEL', tk(P, 'blocked'), ws)
    end
    local ok, obj = pcall(cjson.decode, raw)
    local tid = ''
    if ok and type(obj) == 'table' and type(obj['task_id']) == 'string' then
      tid = obj['task_id']
    end
    redis.call('HSET', tk(P, 'held'), claim, ws .. '\t' .. tenant .. '\t' .. tid)
    redis.call('HSET', tk(P, 'ws', ws), claim, tid)
    redis.call('SADD', tk(P, 'tenant', tenant), claim)
  end
  return {claim, raw, waited, placement or ''}
end

for _, p in ipairs(priorities) do
  local odd = redis.call('RPOP', tk(P, p, 'unreadable'))
  if odd then return hand(p, odd) end
  local line = tk(P, p, 'line')
  local first = 0
  while true do
    local tenants = redis.call('ZRANGE', line, first, first + 99)
    if #tenants == 0 then break end
    for _, tenant in ipairs(tenants) do
      if not tenant_full(P, tenant) then
        local spaces = tk(P, p, 't', tenant)
        local at = 0
        while true do  -- a page at a time: a tenant may have many workspaces waiting
          local page = redis.call('ZRANGE', spaces, at, at + 99)
          if #page == 0 then break end
          for _, ws in ipairs(page) do
            local placement = placed(ws)
            if placement == nil then
              -- another host's workspace
            elseif ws_busy(P, ws) then
              redis.call('HSETNX', tk(P, 'blocked'), ws, now)
            else
              local q = tk(P, p, 'q', tenant, ws)
              local raw = redis.call('RPOP', q)
              if raw then
                redis.call('DECR', tk(P, p, 'count'))
                local tick = redis.call('INCR', tk(P, 'tick'))
                if redis.call('LLEN', q) > 0 then
                  redis.call('ZADD', spaces, tick, ws)
                else
                  redis.call('ZREM', spaces, ws)
                end
                if redis.call('ZCARD', spaces) > 0 then
                  redis.call('ZADD', line, tick, tenant)
                else
                  redis.call('ZREM', line, tenant)
                end
                return hand(p, raw, tenant, ws, placement)
              end
              redis.call('ZREM', spaces, ws)  -- an empty list left in line: drop it
            end
          end
          at = at + 100
        end
      end
    end
    first = first + 100
  end
end
return false
"""
)

# KEYS: in-flight hash   ARGV: claim id, prefix.  The claim's end: it no longer holds anything.
ACK: Final = (
    LIB
    + r"""
settle(ARGV[2], KEYS[1], ARGV[1])
return 1
"""
)

# KEYS: in-flight hash   ARGV: claim id, prefix, priority.  Back to the front of its line.
REQUEUE: Final = (
    LIB
    + r"""
local payload = settle(ARGV[2], KEYS[1], ARGV[1])
if not payload then return 0 end
route(ARGV[2], ARGV[3], payload, true)
return 1
"""
)

# KEYS: in-flight hash, dead-letter list   ARGV: claim id, reason, worker id, time, prefix
DEAD_LETTER: Final = (
    LIB
    + r"""
local payload = settle(ARGV[5], KEYS[1], ARGV[1])
if not payload then return 0 end
redis.call('LPUSH', KEYS[2], cjson.encode({payload = payload, reason = ARGV[2],
                                           worker_id = ARGV[3], dead_lettered_at = ARGV[4]}))
return 1
"""
)

# ARGV: prefix, task id, workspace, tenant, priority, the priorities highest first.
# Returns JSON: {} when the task is not in line, else where it is and what holds it back.
WAITING: Final = (
    LIB
    + r"""
local P, task, ws, tenant, mine = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local priorities = {unpack(ARGV, 6)}
ingest(P, priorities)
local q = redis.call('LRANGE', tk(P, mine, 'q', tenant, ws), 0, -1)
local index = nil
for i = #q, 1, -1 do  -- the oldest is last
  local ok, obj = pcall(cjson.decode, q[i])
  if ok and type(obj) == 'table' and obj['task_id'] == task then index = #q - i; break end
end
if index == nil then return '{}' end
local before = 0
for _, p in ipairs(priorities) do
  if p == mine then break end
  before = before + tonumber(redis.call('GET', tk(P, p, 'count')) or 0)
    + redis.call('LLEN', tk(P, p, 'unreadable'))
end
before = before + redis.call('LLEN', tk(P, mine, 'unreadable'))
local line = {}
for _, t in ipairs(redis.call('ZRANGE', tk(P, mine, 'line'), 0, -1)) do
  local spaces = {}
  for _, w in ipairs(redis.call('ZRANGE', tk(P, mine, 't', t), 0, -1)) do
    spaces[#spaces + 1] = {w, redis.call('LLEN', tk(P, mine, 'q', t, w))}
  end
  line[#line + 1] = {t, spaces}
end
local home = redis.call('HGET', tk(P, 'homes'), ws)
local home_gone = ''
if home and not redis.call('GET', tk(P, 'host', home)) then home_gone = home end
local holders = redis.call('HVALS', tk(P, 'ws', ws))
local api = calls(P, ws)
if #holders == 0 and api > 0 then holders = {'api'} end
return cjson.encode({
  index = index, before = before, line = line,
  held = #holders + api, holder = holders[1] or '', ws_limit = ws_limit(P, ws),
  running = redis.call('SCARD', tk(P, 'tenant', tenant)),
  token_limit = tenant_limit(P, tenant) or -1,
  home_gone = home_gone,
})
"""
)

# ARGV: prefix, the priorities highest first.  Returns JSON: waiting payloads by what holds
# them back (`wsrunner.models.Waiting.kind`).
COUNTS: Final = (
    LIB
    + r"""
local P = ARGV[1]
local priorities = {unpack(ARGV, 2)}
ingest(P, priorities)
local out = {workspace_busy = 0, token_limit = 0, no_free_slot = 0, home_unavailable = 0}
for _, p in ipairs(priorities) do
  out.no_free_slot = out.no_free_slot + redis.call('LLEN', tk(P, p, 'unreadable'))
  for _, tenant in ipairs(redis.call('ZRANGE', tk(P, p, 'line'), 0, -1)) do
    local full = tenant_full(P, tenant)
    for _, ws in ipairs(redis.call('ZRANGE', tk(P, p, 't', tenant), 0, -1)) do
      local n = redis.call('LLEN', tk(P, p, 'q', tenant, ws))
      local home = redis.call('HGET', tk(P, 'homes'), ws)
      if home and not redis.call('GET', tk(P, 'host', home)) then
        out.home_unavailable = out.home_unavailable + n
      elseif ws_busy(P, ws) then
        out.workspace_busy = out.workspace_busy + n
      elseif full then
        out.token_limit = out.token_limit + n
      else
        out.no_free_slot = out.no_free_slot + n
      end
    end
  end
end
return cjson.encode(out)
"""
)

# ARGV: prefix, workspace, hold id, how long it may hold (ms).
# Returns '' when the call now holds the workspace, else what holds it (a task id, or 'api').
HOLD: Final = (
    LIB
    + r"""
local P, ws, hold, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', tk(P, 'calls', ws), '-inf', now - 1)
if ws_busy(P, ws) then
  local holders = redis.call('HVALS', tk(P, 'ws', ws))
  return holders[1] or 'api'
end
local key = tk(P, 'calls', ws)
redis.call('ZADD', key, now + ttl, hold)
local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', key, tonumber(last[2]))  -- gone with the longest hold
return ''
"""
)
