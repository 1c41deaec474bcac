"""The claim rules of `wsrunner.turns` as Lua, so that each claim stays one atomic step in Redis.

Producers still `LPUSH` onto `<prefix>:tasks:<priority>` (the reference system's lists, the
"ingress"). A claim first moves what arrived there into the line of its priority, by tenant
and workspace, then takes the next runnable payload. Keys, under `<prefix>:turns:`:

- `<p>:sites`                SET of the sites with lines: home hosts, and '' (no home yet)
- `<p>:line:<site>`          ZSET tenant -> its place in line (the tick it joined or was
                             served), per site: a claim reads the lines of the sites it may
                             take from, merged, and never walks another host's workspaces
- `<p>:t:<tenant>:<site>`    ZSET workspace -> its place in the tenant's line
- `<p>:q:<tenant>:<ws>`      LIST of payloads: LPUSH to join, RPOP to take
- `<p>:unreadable`           LIST of payloads with no readable workspace (taken first)
- `<p>:count`                payloads in the lines (the depth is this, ingress and unreadable)
- `<p>:totals`               HASH "<tenant><TAB><site>" -> its payloads in that site's line
- `<p>:seq:<tenant>:<ws>`    HASH front, back: the numbers of the next payload to take and of
                             the last to join that list (one given back takes front - 1)
- `<p>:where`                HASH task id -> its number in its list (its place: minus front)
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
- `released`                 ZSET of claims released in the last 10 minutes (by when), which
                             a reassert leaves released
- `waiting`                  HASH workspace -> its payloads in the lines (for `/metrics`)
- `callers`                  SET of workspaces API calls held lately (pruned by `/metrics`)
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
  -- Each item's number in its list, so that a task's place is found without reading the list:
  -- `back` numbers those that join, `front` is the next to be taken, minus those given back.
  local seqs = tk(P, p, 'seq', tenant, ws)
  if redis.call('HSETNX', seqs, 'front', 1) == 1 then redis.call('HSET', seqs, 'back', 0) end
  local seq = next_up and redis.call('HINCRBY', seqs, 'front', -1)
    or redis.call('HINCRBY', seqs, 'back', 1)
  if type(obj['task_id']) == 'string' then
    redis.call('HSET', tk(P, p, 'where'), obj['task_id'], seq)
  end
  -- The lines are kept per site: the workspace's home host, or '' before it has one.
  local site = redis.call('HGET', tk(P, 'homes'), ws) or ''
  redis.call('SADD', tk(P, p, 'sites'), site)
  local spaces, line = tk(P, p, 't', tenant, site), tk(P, p, 'line', site)
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
  redis.call('HINCRBY', tk(P, 'waiting'), ws, 1)
  redis.call('HINCRBY', tk(P, p, 'totals'), tenant .. '\t' .. site, 1)
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
  -- A reassert sent before this release must not bring it back: remembered for 10 minutes.
  redis.call('ZADD', tk(P, 'released'), now, claim)
  redis.call('ZREMRANGEBYSCORE', tk(P, 'released'), '-inf', now - 600000)
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

-- The sites whose lines this host takes from: its own, '' (workspaces with no home yet), the
-- shared hosts' when its volume is shared, and gone hosts' it takes over or fails.
local function sites_here(p)
  local out = {}
  for _, s in ipairs(redis.call('SMEMBERS', tk(P, p, 'sites'))) do
    if host == '' or s == host or s == '' then
      out[#out + 1] = s
    else
      local lease = redis.call('GET', tk(P, 'host', s))
      if lease then
        if lease == 'shared' and volume == 'shared' then out[#out + 1] = s end
      elseif (volume == 'shared' and redis.call('SISMEMBER', tk(P, 'shared'), s) == 1)
          or on_gone == 'fail' then
        out[#out + 1] = s
      end
    end
  end
  return out
end

-- A workspace homed now (first use, or taken over) moves to its new site's lines in every
-- priority, keeping its places there.
local function move_site(ws, tenant, from)
  if from == host then return end
  for _, p in ipairs(priorities) do
    local spaces, line = tk(P, p, 't', tenant, from), tk(P, p, 'line', from)
    local place = redis.call('ZSCORE', spaces, ws)
    if place then
      local turn = redis.call('ZSCORE', line, tenant) or place
      local n = redis.call('LLEN', tk(P, p, 'q', tenant, ws))
      local totals = tk(P, p, 'totals')
      if redis.call('HINCRBY', totals, tenant .. '\t' .. from, -n) <= 0 then
        redis.call('HDEL', totals, tenant .. '\t' .. from)
      end
      redis.call('HINCRBY', totals, tenant .. '\t' .. host, n)
      redis.call('ZREM', spaces, ws)
      if redis.call('ZCARD', spaces) == 0 then redis.call('ZREM', line, tenant) end
      redis.call('ZADD', tk(P, p, 't', tenant, host), place, ws)
      redis.call('ZADD', tk(P, p, 'line', host), 'NX', turn, tenant)
      redis.call('SADD', tk(P, p, 'sites'), host)
    end
  end
end

local function hand(p, raw, tenant, ws, placement, tid, site)
  if placement == 'new' or string.sub(placement or '', 1, 6) == 'moved:' then
    redis.call('HSET', tk(P, 'homes'), ws, host)
    move_site(ws, tenant, site)
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
    redis.call('HSET', tk(P, 'held'), claim, ws .. '\t' .. tenant .. '\t' .. tid)
    redis.call('HSET', tk(P, 'ws', ws), claim, tid)
    redis.call('SADD', tk(P, 'tenant', tenant), claim)
  end
  return {claim, raw, waited, placement or '', ws or ''}
end

-- Take the next payload of `tenant` in `site`, if one of its workspaces there may run now.
local function take(p, site, tenant)
  local spaces, line = tk(P, p, 't', tenant, site), tk(P, p, 'line', site)
  local at = 0
  while true do  -- a page at a time: a tenant may have many workspaces waiting
    local page = redis.call('ZRANGE', spaces, at, at + 99)
    if #page == 0 then return nil end
    for _, ws in ipairs(page) do
      local placement = placed(ws)
      if placement == nil then
        -- another host's workspace (moved there since it joined this line)
      elseif ws_busy(P, ws) then
        redis.call('HSETNX', tk(P, 'blocked'), ws, now)
      else
        local q = tk(P, p, 'q', tenant, ws)
        local raw = redis.call('RPOP', q)
        if raw then
          local seqs = tk(P, p, 'seq', tenant, ws)
          redis.call('HINCRBY', seqs, 'front', 1)
          local ok, obj = pcall(cjson.decode, raw)
          local tid = ''
          if ok and type(obj) == 'table' and type(obj['task_id']) == 'string' then
            tid = obj['task_id']
            redis.call('HDEL', tk(P, p, 'where'), tid)
          end
          redis.call('DECR', tk(P, p, 'count'))
          if redis.call('HINCRBY', tk(P, 'waiting'), ws, -1) <= 0 then
            redis.call('HDEL', tk(P, 'waiting'), ws)
          end
          local unit = tenant .. '\t' .. site
          if redis.call('HINCRBY', tk(P, p, 'totals'), unit, -1) <= 0 then
            redis.call('HDEL', tk(P, p, 'totals'), unit)
          end
          local tick = redis.call('INCR', tk(P, 'tick'))
          if redis.call('LLEN', q) > 0 then
            redis.call('ZADD', spaces, tick, ws)
          else
            redis.call('ZREM', spaces, ws)
            redis.call('DEL', seqs)
          end
          if redis.call('ZCARD', spaces) > 0 then
            redis.call('ZADD', line, tick, tenant)
          else
            redis.call('ZREM', line, tenant)
          end
          return hand(p, raw, tenant, ws, placement, tid, site)
        end
        redis.call('ZREM', spaces, ws)  -- an empty list left in line: drop it
      end
    end
    at = at + 100
  end
end

for _, p in ipairs(priorities) do
  local odd = redis.call('RPOP', tk(P, p, 'unreadable'))
  if odd then return hand(p, odd) end
  -- The sites' lines merged in line order: a cursor over each, a page at a time.
  local cursors = {}
  for _, s in ipairs(sites_here(p)) do
    cursors[#cursors + 1] = {site = s, first = 0, page = {}, i = 1, done = false}
  end
  local function head(c)
    if c.i > #c.page and not c.done then
      local got = redis.call('ZRANGE', tk(P, p, 'line', c.site), c.first, c.first + 99,
                             'WITHSCORES')
      c.first, c.page, c.i = c.first + 100, {}, 1
      for k = 1, #got, 2 do c.page[#c.page + 1] = {got[k], tonumber(got[k + 1])} end
      c.done = #c.page == 0
    end
    return c.page[c.i]
  end
  while true do
    local best, from = nil, nil
    for _, c in ipairs(cursors) do
      local h = head(c)
      if h and (best == nil or h[2] < best[2]) then best, from = h, c end
    end
    if best == nil then break end
    from.i = from.i + 1
    if not tenant_full(P, best[1]) then
      local got = take(p, from.site, best[1])
      if got then return got end
    end
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
local seq = redis.call('HGET', tk(P, mine, 'where'), task)
local front = redis.call('HGET', tk(P, mine, 'seq', tenant, ws), 'front')
if not seq or not front then return '{}' end
local index = tonumber(seq) - tonumber(front)
if index < 0 then return '{}' end
local before = 0
for _, p in ipairs(priorities) do
  if p == mine then break end
  before = before + tonumber(redis.call('GET', tk(P, p, 'count')) or 0)
    + redis.call('LLEN', tk(P, p, 'unreadable'))
end
before = before + redis.call('LLEN', tk(P, mine, 'unreadable'))
-- Its own tenant's workspaces in its site one by one; every other (tenant, site) in the
-- merged lines by its total, ahead of it or behind it by its place, as a claim merges them.
local site = redis.call('HGET', tk(P, 'homes'), ws) or ''
local spaces = {}
for _, w in ipairs(redis.call('ZRANGE', tk(P, mine, 't', tenant, site), 0, -1)) do
  spaces[#spaces + 1] = {w, redis.call('LLEN', tk(P, mine, 'q', tenant, w))}
end
local own = tonumber(redis.call('ZSCORE', tk(P, mine, 'line', site), tenant) or 0)
local totals = redis.call('HGETALL', tk(P, mine, 'totals'))
local ahead, behind = {0}, {0}  -- (never empty: cjson would make {} an object)
for i = 1, #totals, 2 do
  local t, s = string.match(totals[i], '^([^\t]*)\t(.*)$')
  if t and not (t == tenant and s == site) then
    local place = redis.call('ZSCORE', tk(P, mine, 'line', s), t)
    if place and tonumber(place) < own then ahead[#ahead + 1] = tonumber(totals[i + 1])
    else behind[#behind + 1] = tonumber(totals[i + 1]) end
  end
end
local home = redis.call('HGET', tk(P, 'homes'), ws)
local home_gone = ''
if home and not redis.call('GET', tk(P, 'host', home)) then home_gone = home end
local holders = redis.call('HVALS', tk(P, 'ws', ws))
local api = calls(P, ws)
if #holders == 0 and api > 0 then holders = {'api'} end
return cjson.encode({
  index = index, before = before, spaces = spaces, ahead = ahead, behind = behind,
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
-- From what is held and limited, never by walking the lines (a scrape must not stop Redis):
-- a gone home first, then a full workspace, then a token at its limit; the rest is runnable.
local out = {workspace_busy = 0, token_limit = 0, no_free_slot = 0, home_unavailable = 0}
local total = 0
for _, p in ipairs(priorities) do
  total = total + tonumber(redis.call('GET', tk(P, p, 'count')) or 0)
  out.no_free_slot = out.no_free_slot + redis.call('LLEN', tk(P, p, 'unreadable'))
end
local gone = {}
for _, p in ipairs(priorities) do
  for _, s in ipairs(redis.call('SMEMBERS', tk(P, p, 'sites'))) do
    if s ~= '' and gone[s] == nil then gone[s] = not redis.call('GET', tk(P, 'host', s)) end
  end
end
local function gone_home(ws)
  local home = redis.call('HGET', tk(P, 'homes'), ws)
  return home and gone[home]
end
for _, p in ipairs(priorities) do
  local totals = redis.call('HGETALL', tk(P, p, 'totals'))
  for i = 1, #totals, 2 do
    local _, s = string.match(totals[i], '^([^\t]*)\t(.*)$')
    if s and gone[s] then out.home_unavailable = out.home_unavailable + tonumber(totals[i + 1]) end
  end
end
-- Workspaces that hold claims or calls: the only ones that can be full.
local busy = {}
for _, info in ipairs(redis.call('HVALS', tk(P, 'held'))) do
  local ws = string.match(info, '^([^\t]*)\t')
  if ws then busy[ws] = true end
end
for _, ws in ipairs(redis.call('SMEMBERS', tk(P, 'callers'))) do
  if calls(P, ws) > 0 then busy[ws] = true else redis.call('SREM', tk(P, 'callers'), ws) end
end
for ws in pairs(busy) do
  if ws_busy(P, ws) and not gone_home(ws) then
    out.workspace_busy = out.workspace_busy + tonumber(redis.call('HGET', tk(P, 'waiting'), ws) or 0)
  else
    busy[ws] = nil
  end
end
-- Tokens at their running limit: their waiting tasks not counted above.
local limits = redis.call('HGETALL', tk(P, 'limits', 'token'))
for i = 1, #limits, 2 do
  local tenant = 't:' .. limits[i]
  if redis.call('SCARD', tk(P, 'tenant', tenant)) >= tonumber(limits[i + 1]) then
    for _, p in ipairs(priorities) do
      for _, site in ipairs(redis.call('SMEMBERS', tk(P, p, 'sites'))) do
        if not gone[site] then
          local n = tonumber(redis.call('HGET', tk(P, p, 'totals'), tenant .. '\t' .. site) or 0)
          if n > 0 then
            for ws in pairs(busy) do
              n = n - redis.call('LLEN', tk(P, p, 'q', tenant, ws))
            end
            out.token_limit = out.token_limit + math.max(n, 0)
          end
        end
      end
    end
  end
end
out.no_free_slot = out.no_free_slot + math.max(
  total - out.home_unavailable - out.workspace_busy - out.token_limit, 0)
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
redis.call('SADD', tk(P, 'callers'), ws)
local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', key, tonumber(last[2]))  -- gone with the longest hold
return ''
"""
)

# ARGV: prefix, then per claim: claim id, workspace, tenant, task id.  A running task's claim
# holds its workspace and tenant again where Redis lost them (a restart without its data);
# one released meanwhile (`released`) stays released.
REASSERT: Final = (
    LIB
    + r"""
local P = ARGV[1]
for i = 2, #ARGV, 4 do
  local claim, ws, tenant, task = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if redis.call('HEXISTS', tk(P, 'held'), claim) == 0
     and not redis.call('ZSCORE', tk(P, 'released'), claim) then
    redis.call('HSET', tk(P, 'held'), claim, ws .. '\t' .. tenant .. '\t' .. task)
    redis.call('HSET', tk(P, 'ws', ws), claim, task)
    redis.call('SADD', tk(P, 'tenant', tenant), claim)
  end
end
return 1
"""
)

# ARGV: prefix, claim id.  A task's steps are over: its claim stays in flight until its end is
# recorded, but its workspace and tenant are free for the next.
STEPS_OVER: Final = (
    LIB
    + r"""
release(ARGV[1], ARGV[2])
return 1
"""
)
