--[[
  A node's result for a job. Accepted only from the node and attempt the job is assigned to (I2):
  the job ends in its one terminal state (I3), its outcome is emitted for the session together with
  the result, its slot is released (I1), and the freed slot goes to the oldest job waiting in the
  node's pools, in this same call.
  A result for a stale attempt, from another node, or for an unknown job is rejected and changes
  nothing; a repeat of the accepted result is answered "duplicate" and changes nothing (I8).

  Input:
    KEYS[1] cell node registry "<base>nodes"
    KEYS[2] job hash           "<base>job:<job_id>"
    ARGV[1] calling process id
    ARGV[2] job_id
    ARGV[3] node_id (the sender)
    ARGV[4] attempt_id (as sent by the node)
    ARGV[5] outcome: "completed" | "completed_empty" | "failed"
    ARGV[6] error code (for "failed"; "" otherwise)
    ARGV[7] result payload for the client (JSON), carried with the outcome
  Output: JSON {status:"completed"|"duplicate"|"rejected", state, reason?, effects, now}
    reason: "unknown_job" | "stale" (wrong node or attempt) | "not_active"
]]
--- @include "includes/keys"
--- @include "includes/context"
--- @include "includes/slots"
--- @include "includes/select"
--- @include "includes/jobs"

local base = base_of(KEYS[1])
local jid, nid, outcome, code = ARGV[2], ARGV[3], ARGV[5], ARGV[6]
if KEYS[2] ~= k_job(base, jid) then error('ERR dragoman: job key does not match job_id') end
local attempt = tonumber(ARGV[4])
if not attempt then error('ERR dragoman: attempt_id must be a number') end
if outcome ~= 'completed' and outcome ~= 'completed_empty' and outcome ~= 'failed' then
  error('ERR dragoman: outcome must be completed, completed_empty or failed')
end
if outcome == 'failed' and code == '' then code = 'PROCESSING_ERROR' end
if outcome ~= 'failed' then code = '' end

local ctx = new_context(base, ARGV[1])
local j = job_fields(ctx, jid)
if not j then return reply(ctx, { status = 'rejected', reason = 'unknown_job' }) end
if j.node ~= nid or j.attempt ~= attempt then
  return reply(ctx, { status = 'rejected', reason = 'stale', state = j.state })
end
if TERMINAL[j.state] then return reply(ctx, { status = 'duplicate', state = j.state }) end
if j.state ~= 'assigned' and j.state ~= 'running' then
  return reply(ctx, { status = 'rejected', reason = 'not_active', state = j.state })
end

release_slot(ctx, nid, jid)
finish_job(ctx, jid, j, outcome, code, ARGV[7])
fill_from_queues(ctx, nid)
return reply(ctx, { status = 'completed', state = outcome })
