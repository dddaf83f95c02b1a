--[[
  The reaper's transition, safe to run from every process at once (each call is atomic and finds
  only what is still due). In one call, at most ARGV[2] items of each kind:
    1. nodes past their heartbeat deadline go offline; each job they held is reassigned
       (attempt + 1, to another node when one is free), queued, or failed after the attempt cap;
    2. jobs past their lease (job_timeout from assignment) get a job_cancel for their node and are
       reassigned the same way; the node's freed slot may take waiting work (a batch counts nodes
       whose lease index score came due, each looked at whole); a slot the node holds for a job
       that is gone or is no longer its own is given back (I1: none is held for nothing; only a
       faulty ack can leave one: see ack_outcomes);
    3. queued jobs past their pending timeout fail with JOB_TIMEOUT;
    4. scheduler processes whose registration expired more than proc_ttl ago: their nodes go
       offline (their jobs move on at once), their sessions become orphans (kept for a client that
       resumes), their inbox goes (the caller itself is alive whatever its registration says: it
       is renewed instead);
    5. orphan sessions past their grace period are abandoned: their waiting jobs are cancelled,
       running ones get job_cancel, and the session is forgotten; rooms without speech for their
       expiry are closed (room_expired to each member); a dead process's room members leave;
    6. nodes offline for more than an hour leave the operators' list of recent nodes.
  Together with the reaper interval this bounds recovery (I5, I10).

  Input:
    KEYS[1] cell node registry "<base>nodes"
    ARGV[1] calling process id
    ARGV[2] batch size per kind
    ARGV[3] session resume grace ms (for sessions of dead processes)
    ARGV[4] call id (a retry after a lost reply gets the same reply again)
    ARGV[5] "1" right after the caller could not reach Redis for a while (a stall, a restart): then
            nobody could renew anything, so deadlines that passed meanwhile say nothing of who is
            alive; steps 1 and 4 wait until everyone had a chance to renew
    ARGV[6] proc_ttl_ms: the caller's own lapsed registration is renewed for this long, and another
            process is dead once its registration has been lapsed this long
  Derived keys (same hash tag): node:*, job:*, pool:*, queue:*, sess:*, proc:*, leases, pending,
    orphans, procs, inbox:*, pools, stats, events, offline, boot
  Output: [body, effects, payloads...], body {status:"ok", dead_nodes, expired_leases, expired_pending,
    dead_procs, abandoned, more, boot, now}
    more: true when a batch was full (call again soon); boot: the cell's data generation marker
]]
--- @include "includes/keys"
--- @include "includes/context"
--- @include "includes/nodes"
--- @include "includes/jobs"
--- @include "includes/sessions"
--- @include "includes/rooms"

local base = base_of(KEYS[1])
local batch = need_number(ARGV[2], 'batch', 1)
local grace = need_number(ARGV[3], 'grace_ms')
local proc_ttl = need_number(ARGV[6], 'proc_ttl_ms', 1)
local ctx = new_context(base, ARGV[1])
local again = replay(ctx, ARGV[4])
if again then return again end
local more = false

local lenient = ARGV[5] == '1'
local dead = {}
if not lenient then dead = rcall('ZRANGE', KEYS[1], '-inf', ctx.now - 1, 'BYSCORE', 'LIMIT', 0, batch) end
for _, nid in ipairs(dead) do
  if node_down(ctx, nid, 'heartbeat_timeout') < 0 then rcall('ZREM', KEYS[1], nid) end
end
if #dead == batch then more = true end

-- Leases: the index scores nodes, each no later than the earliest lease of its jobs (see
-- includes/nodes.lua); a node due is looked at whole, and scored exactly again.
local due = rcall('ZRANGE', k_leases(base), '-inf', ctx.now - 1, 'BYSCORE', 'LIMIT', 0, batch)
local expired = 0
for _, nid in ipairs(due) do
  local n = node_fields(ctx, nid)
  if not n then
    rcall('ZREM', k_leases(base), nid)
  else
    local lapsed, stray = {}, 0
    for _, jid in ipairs(split_words(n.jobs)) do
      local j = job_fields(ctx, jid)
      if not held_by(j, nid) then
        release_slot(ctx, nid, jid, j and j.pool or nil)
        count(ctx, 'stray_slots')
        stray = stray + 1
      elseif (tonumber(rcall('HGET', j.key, 'lease')) or 0) < ctx.now then
        lapsed[#lapsed + 1] = { jid, j }
      end
    end
    for _, job in ipairs(lapsed) do
      local jid, j = job[1], job[2]
      emit(ctx, n.proc, { kind = 'cancel', job = jid, node = nid, attempt = j.attempt, reason = 'lease_expired' })
      count(ctx, 'lease_expired')
      release_slot(ctx, nid, jid, j.pool)
      reassign_or_fail(ctx, jid, j)
    end
    expired = expired + #lapsed
    if #lapsed + stray > 0 then fill_from_queues(ctx, nid) end
    n = node_fields(ctx, nid)  -- (its jobs now: it may have taken others meanwhile)
    if n then reindex_leases(ctx, n) end
  end
end
if #due == batch then more = true end

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

-- The caller is running this very script, so it is alive whatever its registration says (its
-- renewal was late: Redis stalled or failed over).
local own = tonumber(rcall('ZSCORE', k_procs(base), ctx.proc) or '')
if own and own < ctx.now then rcall('ZADD', k_procs(base), ctx.now + proc_ttl, ctx.proc) end
-- A process is dead once its registration has lapsed for a further proc_ttl: an outage of Redis
-- (a failover takes seconds) lets every registration lapse at once, and the first reaper to run
-- after it must not bury the processes whose renewal is a moment behind its own.
-- (The caller, renewed just above, is never among them.)
local procs = {}
if not lenient then
  procs = rcall('ZRANGE', k_procs(base), '-inf', ctx.now - proc_ttl - 1, 'BYSCORE', 'LIMIT', 0, batch)
end
for _, p in ipairs(procs) do
  for _, nid in ipairs(rcall('SPOP', k_proc_nodes(base, p), batch)) do
    local n = node_fields(ctx, nid)
    if n and n.proc == p then node_down(ctx, nid, 'scheduler_lost') end
  end
  for _, sid in ipairs(rcall('SPOP', k_proc_sessions(base, p), batch)) do
    if rcall('HGET', k_sess(base, sid), 'proc') == p then session_orphan(ctx, sid, grace) end
  end
  for _, entry in ipairs(rcall('SPOP', k_proc_rooms(base, p), batch)) do
    local code, sid = string.match(entry, '^(%S+) (%S+)$')
    if code then room_remove(ctx, code, sid) end
  end
  if rcall('EXISTS', k_proc_nodes(base, p), k_proc_sessions(base, p), k_proc_rooms(base, p)) == 0 then
    rcall('DEL', k_inbox(base, p))
    rcall('ZREM', k_procs(base), p)
    log_event(ctx, 'scheduler_lost', { proc = p })
  else
    more = true
  end
end

local quiet = rcall('ZRANGE', k_rooms(base), '-inf', ctx.now - 1, 'BYSCORE', 'LIMIT', 0, batch)
for _, code in ipairs(quiet) do room_expire(ctx, code) end
if #quiet == batch then more = true end

local gone = rcall('ZRANGE', k_orphans(base), '-inf', ctx.now - 1, 'BYSCORE', 'LIMIT', 0, batch)
for _, sid in ipairs(gone) do
  session_abandon(ctx, sid, 'resume_grace_expired')
end
if #gone == batch then more = true end

rcall('ZREMRANGEBYSCORE', k_offline(base), '-inf', ctx.now - 3600000)

return reply(ctx, { status = 'ok', dead_nodes = #dead, expired_leases = expired,
  expired_pending = #waited, dead_procs = #procs, abandoned = #gone, rooms_expired = #quiet, more = more,
  boot = rcall('GET', k_boot(base)) or '' })
