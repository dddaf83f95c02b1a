--[[
  Register a node, or re-register it on reconnect (same node_id): it becomes ready, joins its pools
  with its free capacity, and its free slots are handed to jobs waiting in those pools.
  Jobs it already holds stay with it (counted in `used`): their results are still accepted, and
  their leases recover them if it lost them.

  Input:
    KEYS[1] cell node registry  "<base>nodes"  (zset node_id -> heartbeat deadline ms)
    KEYS[2] node hash           "<base>node:<node_id>"
    KEYS[3] node job set        "<base>node:<node_id>:jobs"
    ARGV[1] calling process id
    ARGV[2] node_id
    ARGV[3] connection id (fences heartbeats and offline calls from an older socket)
    ARGV[4] max_concurrency (integer 1..1024)
    ARGV[5] pool ids, space separated
    ARGV[6] node info (JSON, kept for operators)
    ARGV[7] node_ttl_ms (heartbeat deadline = now + node_ttl_ms)
  Derived keys (same hash tag): pool:<id>, queue:<id>, pools, job:*, leases, pending, stats, events, inbox:*
  Output: JSON {status:"registered", node, state, max, used, deadline, reconnected, effects, now}
    state is "draining" when the node was draining before it reconnected (a drain outlives a reconnect)
  Errors: "ERR dragoman: ..." on invalid arguments (no state changed).
]]
--- @include "includes/keys"
--- @include "includes/context"
--- @include "includes/slots"
--- @include "includes/select"
--- @include "includes/jobs"

local base = base_of(KEYS[1])
local nid, conn, pools = ARGV[2], ARGV[3], ARGV[5]
local max = tonumber(ARGV[4])
if nid == '' or KEYS[2] ~= k_node(base, nid) or KEYS[3] ~= k_node_jobs(base, nid) then
  error('ERR dragoman: node key does not match node_id')
end
if not max or max < 1 or max > 1024 or max % 1 ~= 0 then
  error('ERR dragoman: max_concurrency must be an integer from 1 to 1024')
end
local ttl = tonumber(ARGV[7])
if not ttl or ttl <= 0 then error('ERR dragoman: node_ttl_ms must be positive') end

local ctx = new_context(base, ARGV[1])
local old = node_fields(ctx, nid)
if old then unpool(ctx, nid, old.pools) end
-- A drain outlives a reconnect: an operator's until undrained, the node's own until its next heartbeat.
local state, drain_source = 'ready', ''
if old and old.state == 'draining' then
  state, drain_source = 'draining', rcall('HGET', KEYS[2], 'drain_source') or ''
end
local used = rcall('SCARD', KEYS[3])
local deadline = ctx.now + ttl
-- A capacity lowered below the jobs the node already holds takes effect as they finish (I1).
local effective = math.max(max, used)
if effective > max then rcall('HSET', KEYS[2], 'max_target', max) else rcall('HDEL', KEYS[2], 'max_target') end
rcall('HSET', KEYS[2], 'id', nid, 'state', state, 'max', effective, 'used', used, 'deadline', deadline,
  'pools', pools, 'proc', ctx.proc, 'conn', conn, 'info', ARGV[6], 'registered_at', ctx.now,
  'drain_source', drain_source, 'last_heartbeat', ctx.now)
rcall('PERSIST', KEYS[2])
rcall('ZADD', KEYS[1], deadline, nid)
rcall('ZREM', k_offline(base), nid)
for _, pid in ipairs(split_words(pools)) do rcall('SADD', k_pools(base), pid) end
rcall('HINCRBY', k_stats(base), 'registrations', 1)
if not old or old.state == 'offline' then log_event(ctx, 'node_ready', { node = nid, max = max }) end
if state == 'ready' then
  score_pools(ctx, nid, node_fields(ctx, nid))
  fill_from_queues(ctx, nid)
end
return reply(ctx, { status = 'registered', node = nid, state = state, max = effective, used = used,
  deadline = deadline, reconnected = old ~= nil })
