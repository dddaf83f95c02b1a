--[[
  A node's heartbeat: extends its liveness deadline, honours its draining flag, re-pools it when
  its languages changed (the pools it left shrink), and sets its exact free capacity in its pools
  when a dispatch may have dropped it (it was late) and otherwise once a minute (RESCORE_MS). A
  live node's free slots go to waiting jobs.
  A job's own lease (job_timeout from assignment) is NOT extended: a node that heartbeats but never
  answers still loses the job when the lease runs out.

  Input:
    KEYS[1] cell node registry "<base>nodes"
    KEYS[2] node hash          "<base>node:<node_id>"
    ARGV[1] calling process id
    ARGV[2] node_id
    ARGV[3] connection id ("" accepts any connection)
    ARGV[4] node_ttl_ms
    ARGV[5] draining: "1" take nothing new, "0" not draining, "" unchanged
    ARGV[6] "1" to replace the node's pools with ARGV[7], else ""
    ARGV[7] pool ids, space separated (validated by the caller, as at registration)
    ARGV[8] resource usage (JSON, kept for operators)
    ARGV[9] call id (a retry after a lost reply gets the same reply again)
  Output: [body, effects, payloads...], body {status:"ok"|"unknown"|"superseded", state, used, max, deadline, now}
    unknown: no such node or it is offline (the caller registers it again)
    superseded: the heartbeat came over an older connection than the node's current one
]]
--- @include "includes/keys"
--- @include "includes/context"
--- @include "includes/nodes"
--- @include "includes/jobs"

local base = base_of(KEYS[1])
local nid, conn = ARGV[2], ARGV[3]
if KEYS[2] ~= k_node(base, nid) then error('ERR dragoman: node key does not match node_id') end
local ttl = need_number(ARGV[4], 'node_ttl_ms', 1)

local ctx = new_context(base, ARGV[1])
local again = replay(ctx, ARGV[9])
if again then return again end
local n = node_fields(ctx, nid, { 'conn', 'drain_source', 'scored_at' })
if n and conn ~= '' and n.more.conn and n.more.conn ~= conn then
  -- checked first: an older socket must not re-register a node that now lives on another one
  return reply(ctx, { status = 'superseded' })
end
if not n or n.state == 'offline' then return reply(ctx, { status = 'unknown' }) end

-- Live and ready until now: nothing dropped it from its pools, whose scores can only over-state its
-- free slots (see includes/nodes.lua), so they are set again only now and then (RESCORE_MS).
local RESCORE_MS = 60000
local was_live = node_is_live(ctx, n)
local rescore = not was_live or ctx.now - (tonumber(n.more.scored_at) or 0) >= RESCORE_MS

local deadline = ctx.now + ttl
rcall('HSET', KEYS[2], 'deadline', deadline, 'last_heartbeat', ctx.now, 'usage', ARGV[8])
rcall('ZADD', KEYS[1], deadline, nid)
n.deadline = deadline

if ARGV[6] == '1' and ARGV[7] ~= n.pools then
  unpool(ctx, nid, n.pools)
  count_pools(ctx, n.pools, -1)
  rcall('HSET', KEYS[2], 'pools', ARGV[7])
  count_pools(ctx, ARGV[7], 1)
  n.pools = ARGV[7]
  rescore = true
  log_event(ctx, 'node_repooled', { node = nid, pools = ARGV[7] })
end

local source = n.more.drain_source or ''
if ARGV[5] == '1' and n.state == 'ready' then
  n.state = 'draining'
  rcall('HSET', KEYS[2], 'state', n.state, 'drain_source', 'node')
  log_event(ctx, 'node_draining', { node = nid, source = 'node' })
elseif ARGV[5] == '0' and n.state == 'draining' and source == 'node' then
  n.state = 'ready'
  rescore = true
  rcall('HSET', KEYS[2], 'state', n.state, 'drain_source', '')
end

if n.state == 'ready' then
  if rescore then
    score_pools(ctx, n)
    rcall('HSET', KEYS[2], 'scored_at', ctx.now)
  end
  fill_from_queues(ctx, nid)
else
  unpool(ctx, nid, n.pools)
end
return reply(ctx, { status = 'ok', state = n.state, used = node_used(ctx, nid), max = n.max, deadline = deadline })
