--[[
  Cancel a job (operator action): a running job's node gets job_cancel and its slot back; a waiting
  job leaves its queue; the job fails with the given code and the session hears that one outcome.
  A finished job is left as it is.

  Input:
    KEYS[1] cell node registry "<base>nodes"
    KEYS[2] job hash           "<base>job:<job_id>"
    ARGV[1] calling process id
    ARGV[2] job_id
    ARGV[3] failure code (e.g. "JOB_CANCELLED")
    ARGV[4] call id (a retry after a lost reply gets the same reply again)
  Output: [body, effects, payloads...], body {status:"cancelled"|"finished"|"unknown", state, now}
]]
--- @include "includes/keys"
--- @include "includes/context"
--- @include "includes/nodes"
--- @include "includes/jobs"

local base = base_of(KEYS[1])
local jid = ARGV[2]
if KEYS[2] ~= k_job(base, jid) then error('ERR dragoman: job key does not match job_id') end
local ctx = new_context(base, ARGV[1])
local again = replay(ctx, ARGV[4])
if again then return again end
local j = job_fields(ctx, jid)
if not j then return reply(ctx, { status = 'unknown' }) end
if TERMINAL[j.state] then return reply(ctx, { status = 'finished', state = j.state }) end
local holder = j.node
if j.state == 'queued' then
  rcall('LREM', k_queue(base, j.pool), 1, jid)
elseif holder ~= '' then
  local n = node_fields(ctx, holder)
  emit(ctx, n and n.proc or '', { kind = 'cancel', job = jid, node = holder, attempt = j.attempt, reason = 'cancelled' })
  release_slot(ctx, holder, jid, j.pool)
end
finish_job(ctx, jid, j, 'failed', ARGV[3] ~= '' and ARGV[3] or 'JOB_CANCELLED')
if holder ~= '' then fill_from_queues(ctx, holder) end
return reply(ctx, { status = 'cancelled', state = 'failed' })
