--[[
  Register a node, or register it again (reconnect, same node_id): it becomes ready, joins its pools
  with its free capacity, and its free slots go to jobs waiting in those pools.

  Only the holder speaks for a node (I11): a node id in use by a live connection (its deadline not
  passed, its scheduler process alive) is refused ("in_use") unless the caller knows that connection
  is gone ("force"), or (with node tokens) the same token registers it again; with node tokens, an id
  stays bound to the token that first registered it ("forbidden" for any other).

  Jobs it holds stay with it, reconciled with what Redis knows: a job that no longer exists, has
  ended, or moved to another holder leaves its "jobs", so `used` is exactly the jobs it holds (I1),
  and its lease index score is set again from theirs. The
  ones it holds are sent to it again over this connection: a node that never received one (it was
  assigned through a scheduler process that then died) runs it now; a node that has it ignores it.

  Input:
    KEYS[1] cell node registry  "<base>nodes"  (zset node_id -> heartbeat deadline ms)
    KEYS[2] node hash           "<base>node:<node_id>"
    ARGV[1] calling process id
    ARGV[2] node_id
    ARGV[3] connection id (fences heartbeats and offline calls from an older socket)
    ARGV[4] max_concurrency (integer 1..1024)
    ARGV[5] pool ids, space separated
    ARGV[6] node info (JSON, kept for operators)
    ARGV[7] node_ttl_ms (heartbeat deadline = now + node_ttl_ms)
    ARGV[8] owner: digest of the node token used ("" without tokens)
    ARGV[9] "force" to take over from a connection the caller knows is gone, else ""
    ARGV[10] call id (a retry after a lost reply gets the same reply again)
  Output: [body, effects, payloads...], body {status, node, state, max, used, held, deadline, reconnected, proc, now}
    status "registered" | "in_use" (proc: the process holding the live connection) | "forbidden"
    state is "draining" when the node was draining before it reconnected (a drain outlives a reconnect)
]]
--- @include "includes/keys"
--- @include "includes/context"
--- @include "includes/nodes"
--- @include "includes/jobs"

local base = base_of(KEYS[1])
local nid, conn, pools, owner = ARGV[2], ARGV[3], ARGV[5], ARGV[8]
if nid == '' or KEYS[2] ~= k_node(base, nid) then
  error('ERR dragoman: node key does not match node_id')
end
local max = tonumber(ARGV[4])
if not max or max < 1 or max > 1024 or max % 1 ~= 0 then
  error('ERR dragoman: max_concurrency must be an integer from 1 to 1024')
end
local ttl = need_number(ARGV[7], 'node_ttl_ms', 1)

local ctx = new_context(base, ARGV[1])
local again = replay(ctx, ARGV[10])
if again then return again end
local old = node_fields(ctx, nid)
local meta = rcall('HMGET', KEYS[2], 'conn', 'owner', 'drain_source')
if old then
  if (meta[2] or '') ~= '' and meta[2] ~= owner then return reply(ctx, { status = 'forbidden' }) end
  -- The same token proves the same node (a node reconnecting before its old socket was noticed gone);
  -- without tokens, only a connection that is gone (its process dead, or the caller's word) yields.
  local proven = owner ~= '' and meta[2] == owner
  if old.state ~= 'offline' and meta[1] ~= conn and ARGV[9] ~= 'force' and not proven
      and old.deadline >= ctx.now and old.proc ~= '' and proc_alive(ctx, old.proc) then
    return reply(ctx, { status = 'in_use', proc = old.proc })
  end
  unpool(ctx, nid, old.pools)
  if old.state ~= 'offline' then count_pools(ctx, old.pools, -1) end
  if old.proc ~= '' and old.proc ~= ctx.proc then rcall('SREM', k_proc_nodes(base, old.proc), nid) end
end
-- A drain outlives a reconnect: an operator's until undrained, the node's own until its next heartbeat.
local state, drain_source = 'ready', ''
if old and old.state == 'draining' then state, drain_source = 'draining', meta[3] or '' end

local held, kept = {}, {}
for _, jid in ipairs(split_words(old and old.jobs)) do
  local j = job_fields(ctx, jid)
  if held_by(j, nid) then
    table.insert(held, { jid, j })
    table.insert(kept, jid)
  end
end
local used = #held
local deadline = ctx.now + ttl
-- A capacity lowered below the jobs the node already holds takes effect as they finish (I1).
local effective = math.max(max, used)
if effective > max then rcall('HSET', KEYS[2], 'max_target', max) else rcall('HDEL', KEYS[2], 'max_target') end
-- (the fields every job reads first: a small record is a list the server scans field by field)
rcall('HSET', KEYS[2], 'state', state, 'max', effective, 'deadline', deadline, 'pools', pools, 'proc', ctx.proc,
  'jobs', table.concat(kept, ' '), 'used', used, 'id', nid, 'conn', conn, 'info', ARGV[6], 'registered_at', ctx.now,
  'drain_source', drain_source, 'last_heartbeat', ctx.now, 'owner', owner)
rcall('PERSIST', KEYS[2])
rcall('ZADD', KEYS[1], deadline, nid)
rcall('ZREM', k_offline(base), nid)
rcall('SADD', k_proc_nodes(base, ctx.proc), nid)
count_pools(ctx, pools, 1)
count(ctx, 'registrations')
if not old or old.state == 'offline' then log_event(ctx, 'node_ready', { node = nid, max = max }) end

local n = node_fields(ctx, nid)
reindex_leases(ctx, n)
for _, h in ipairs(held) do
  local jid, j = h[1], h[2]
  emit(ctx, ctx.proc, { kind = 'assign', job = jid, node = nid, attempt = j.attempt, session = j.session,
    utt = j.utt, tgt = j.tgt, lease = tonumber(rcall('HGET', k_job(base, jid), 'lease')) or 0 },
    rcall('HGET', k_job(base, jid), 'data'))
end
if state == 'ready' then
  score_pools(ctx, n)
  fill_from_queues(ctx, nid, n)
end
return reply(ctx, { status = 'registered', node = nid, state = state, max = effective, used = used,
  held = #held, deadline = deadline, reconnected = old ~= nil })
