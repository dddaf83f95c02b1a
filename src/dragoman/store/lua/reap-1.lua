--[[
  The reaper's transition, safe to run from every process at once (each call is atomic and finds
  only what is still due). In one call, at most ARGV[2] items of each kind:
    1. nodes past their heartbeat deadline go offline; each job they held is reassigned
       (attempt + 1, to another node when one is free), queued, or failed after the attempt cap;
    2. jobs past their lease (job_timeout from assignment) get a job_cancel for their node and are
       reassigned the same way; the node's freed slot may take waiting work;
    3. queued jobs past their pending timeout fail with JOB_TIMEOUT;
    4. scheduler processes whose registration expired lose their inbox streams;
    5. nodes offline for more than an hour leave the operators' list of recent nodes.
  Together with the reaper interval this bounds recovery (I5).

  Input:
    KEYS[1] cell node registry "<base>nodes"
    ARGV[1] calling process id
    ARGV[2] batch size per kind
  Derived keys (same hash tag): node:*, job:*, pool:*, queue:*, leases, pending, procs, inbox:*, stats, events
  Output: JSON {status:"ok", dead_nodes, expired_leases, expired_pending, dead_procs, more, effects, now}
    more: true when a batch was full (call again soon)
]]
--- @include "includes/keys"
--- @include "includes/context"
--- @include "includes/slots"
--- @include "includes/select"
--- @include "includes/jobs"

local base = base_of(KEYS[1])
local batch = tonumber(ARGV[2]) or 100
local ctx = new_context(base, ARGV[1])
local more = false

local dead = rcall('ZRANGE', KEYS[1], '-inf', ctx.now - 1, 'BYSCORE', 'LIMIT', 0, batch)
for _, nid in ipairs(dead) do
  if node_down(ctx, nid, 'heartbeat_timeout') < 0 then rcall('ZREM', KEYS[1], nid) end
end
if #dead == batch then more = true end

local expired = rcall('ZRANGE', k_leases(base), '-inf', ctx.now - 1, 'BYSCORE', 'LIMIT', 0, batch)
for _, jid in ipairs(expired) do
  local j = job_fields(ctx, jid)
  if not j or TERMINAL[j.state] or j.node == '' then
    rcall('ZREM', k_leases(base), jid)
  else
    local old = j.node
    local proc = rcall('HGET', k_node(base, old), 'proc') or ''
    emit(ctx, proc, { kind = 'cancel', job = jid, node = old, attempt = j.attempt, reason = 'lease_expired' })
    rcall('HINCRBY', k_stats(base), 'lease_expired', 1)
    release_slot(ctx, old, jid)
    reassign_or_fail(ctx, jid, j)
    fill_from_queues(ctx, old)
  end
end
if #expired == batch then more = true end

local waited = rcall('ZRANGE', k_pending(base), '-inf', ctx.now - 1, 'BYSCORE', 'LIMIT', 0, batch)
for _, jid in ipairs(waited) do
  local j = job_fields(ctx, jid)
  rcall('ZREM', k_pending(base), jid)
  if j and j.state == 'queued' then
    rcall('LREM', k_queue(base, j.pool), 1, jid)
    finish_job(ctx, jid, j, 'failed', 'JOB_TIMEOUT')
  end
end
if #waited == batch then more = true end

local procs = rcall('ZRANGE', k_procs(base), '-inf', ctx.now - 1, 'BYSCORE', 'LIMIT', 0, batch)
for _, p in ipairs(procs) do
  rcall('DEL', k_inbox(base, p))
  rcall('ZREM', k_procs(base), p)
end

rcall('ZREMRANGEBYSCORE', k_offline(base), '-inf', ctx.now - 3600000)

return reply(ctx, { status = 'ok', dead_nodes = #dead, expired_leases = #expired,
  expired_pending = #waited, dead_procs = #procs, more = more })
