--[[
  A node's heartbeat: extends its liveness deadline, honours its draining flag, re-pools it when
  its languages changed, and puts it back in its pools (a dispatch may have dropped it while it was
  late). A live node's free slots are handed to waiting jobs.
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
    ARGV[7] pool ids, space separated
    ARGV[8] resource usage (JSON, kept for operators)
  Output: JSON {status:"ok"|"unknown"|"superseded", state, used, max, deadline, effects, now}
    unknown: no such node or it is offline (the caller re-registers it)
    superseded: the heartbeat came over an older connection than the node's current one
]]
--- @include "includes/keys"
--- @include "includes/context"
--- @include "includes/slots"
--- @include "includes/select"
--- @include "includes/jobs"

local base = base_of(KEYS[1])
local nid, conn = ARGV[2], ARGV[3]
if KEYS[2] ~= k_node(base, nid) then error('ERR dragoman: node key does not match node_id') end
local ttl = tonumber(ARGV[4])
if not ttl or ttl <= 0 then error('ERR dragoman: node_ttl_ms must be positive') end

local ctx = new_context(base, ARGV[1])
local n = node_fields(ctx, nid)
local current = rcall('HGET', KEYS[2], 'conn')
if conn ~= '' and current and current ~= conn then
  -- checked first: an older socket must not re-register a node that now lives on another one
  return reply(ctx, { status = 'superseded' })
end
if not n or n.state == 'offline' then return reply(ctx, { status = 'unknown' }) end

local deadline = ctx.now + ttl
rcall('HSET', KEYS[2], 'deadline', deadline, 'last_heartbeat', ctx.now, 'usage', ARGV[8])
rcall('ZADD', KEYS[1], deadline, nid)

if ARGV[6] == '1' and ARGV[7] ~= n.pools then
  unpool(ctx, nid, n.pools)
  rcall('HSET', KEYS[2], 'pools', ARGV[7])
  for _, pid in ipairs(split_words(ARGV[7])) do rcall('SADD', k_pools(base), pid) end
  log_event(ctx, 'node_repooled', { node = nid, pools = ARGV[7] })
end

local state = n.state
local source = rcall('HGET', KEYS[2], 'drain_source') or ''
if ARGV[5] == '1' and state == 'ready' then
  state = 'draining'
  rcall('HSET', KEYS[2], 'state', state, 'drain_source', 'node')
  log_event(ctx, 'node_draining', { node = nid, source = 'node' })
elseif ARGV[5] == '0' and state == 'draining' and source == 'node' then
  state = 'ready'
  rcall('HSET', KEYS[2], 'state', state, 'drain_source', '')
end

n = node_fields(ctx, nid)
if state == 'ready' then
  score_pools(ctx, nid, n)
  fill_from_queues(ctx, nid)
  n = node_fields(ctx, nid)
else
  unpool(ctx, nid, n.pools)
end
return reply(ctx, { status = 'ok', state = n.state, used = n.used, max = n.max, deadline = deadline })
