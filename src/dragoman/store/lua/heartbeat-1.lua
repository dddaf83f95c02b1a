--[[
  Node heartbeats, any number of them in one call (a scheduler process collects the heartbeats of a
  few milliseconds, of all its nodes of one cell, into one call). Each one: extends its node's
  liveness deadline, honours its draining flag, re-pools it when its languages changed (the pools it
  left shrink), and sets its exact free capacity in its pools when a dispatch may have dropped it (it
  was late) and otherwise once a minute (RESCORE_MS). A live node's free slots go to waiting jobs.
  The heartbeats are applied in order, each as the single-node transition would; one call is still
  one atomic step.
  A job's own lease (job_timeout from assignment) is NOT extended: a node that heartbeats but never
  answers still loses the job when the lease runs out.

  Input:
    KEYS[1] cell node registry "<base>nodes"
    ARGV[1] calling process id
    ARGV[2] node_ttl_ms
    ARGV[3] call id (a retry after a lost reply gets the same reply again)
    ARGV[4..] six per heartbeat:
      node_id
      connection id ("" accepts any connection)
      draining: "1" take nothing new, "0" not draining, "" unchanged
      "1" to replace the node's pools with the next one, else ""
      pool ids, space separated (validated by the caller, as at registration)
      resource usage (JSON, kept for operators)
  Output: [body, effects, payloads...], body {status:"ok", nodes:[one per heartbeat, in order], now},
    each {status:"ok"|"unknown"|"superseded", state, used, max, deadline}
    unknown: no such node or it is offline (the caller registers it again)
    superseded: the heartbeat came over an older connection than the node's current one
]]
--- @include "includes/keys"
--- @include "includes/context"
--- @include "includes/nodes"
--- @include "includes/jobs"

local base = base_of(KEYS[1])
local ttl = need_number(ARGV[2], 'node_ttl_ms', 1)
local GROUP = 6
if #ARGV < 3 + GROUP or (#ARGV - 3) % GROUP ~= 0 then
  error('ERR dragoman: heartbeats come as groups of ' .. GROUP .. ' arguments')
end
for i = 4, #ARGV, GROUP do  -- everything checked before anything is written
  if ARGV[i] == '' then error('ERR dragoman: a heartbeat without node_id') end
  if ARGV[i + 2] ~= '' and ARGV[i + 2] ~= '0' and ARGV[i + 2] ~= '1' then
    error('ERR dragoman: draining must be "1", "0" or ""')
  end
end

local ctx = new_context(base, ARGV[1])
local again = replay(ctx, ARGV[3])
if again then return again end

-- Live and ready until now: nothing dropped it from its pools, whose scores can only over-state its
-- free slots (see includes/nodes.lua), so they are set again only now and then (RESCORE_MS).
local RESCORE_MS = 60000

local function heartbeat(nid, conn, drain, set_pools, pools, usage)
  local nk = k_node(base, nid)
  local n = node_fields(ctx, nid, { 'conn', 'drain_source', 'scored_at' })
  if n and conn ~= '' and n.more.conn and n.more.conn ~= conn then
    -- checked first: an older socket must not re-register a node that now lives on another one
    return { status = 'superseded' }
  end
  if not n or n.state == 'offline' then return { status = 'unknown' } end

  local was_live = node_is_live(ctx, n)
  local rescore = not was_live or ctx.now - (tonumber(n.more.scored_at) or 0) >= RESCORE_MS

  local deadline = ctx.now + ttl
  rcall('HSET', nk, 'deadline', deadline, 'last_heartbeat', ctx.now, 'usage', usage)
  rcall('ZADD', KEYS[1], deadline, nid)
  n.deadline = deadline

  if set_pools == '1' and pools ~= n.pools then
    unpool(ctx, nid, n.pools)
    count_pools(ctx, n.pools, -1)
    rcall('HSET', nk, 'pools', pools)
    count_pools(ctx, pools, 1)
    n.pools = pools
    rescore = true
    log_event(ctx, 'node_repooled', { node = nid, pools = pools })
  end

  local source = n.more.drain_source or ''
  if drain == '1' and n.state == 'ready' then
    n.state = 'draining'
    rcall('HSET', nk, 'state', n.state, 'drain_source', 'node')
    log_event(ctx, 'node_draining', { node = nid, source = 'node' })
  elseif drain == '0' and n.state == 'draining' and source == 'node' then
    n.state = 'ready'
    rescore = true
    rcall('HSET', nk, 'state', n.state, 'drain_source', '')
  end

  if n.state == 'ready' then
    if rescore then
      score_pools(ctx, n)
      rcall('HSET', nk, 'scored_at', ctx.now)
    end
    fill_from_queues(ctx, nid, n)
  else
    unpool(ctx, nid, n.pools)
  end
  return { status = 'ok', state = n.state, used = n.used, max = n.max, deadline = deadline }
end

local out = {}
for i = 4, #ARGV, GROUP do
  table.insert(out, heartbeat(ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]))
end
return reply(ctx, { status = 'ok', nodes = out })
