--[[
  A node's result for a job. Accepted only from the node and attempt the job is assigned to (I2):
  the job ends in its one terminal state (I3), its outcome is emitted for the session together with
  the result (and kept with the job until the session acknowledges it), its slot is released (I1),
  and the freed slot goes to the oldest job waiting in the node's pools, in this same call (the
  queues are read only when one may hold such a job: see fill_after_release).

  Outcome "refused" is a node saying it cannot take the job (full, or it already runs another target
  of that utterance): the slot comes back (to the oldest job waiting for the node's pools, as after
  a result) and the job moves on to another node, like a lost holder.

  A result for a stale attempt, from another node, or for an unknown job is rejected and changes
  nothing. A repeat of the accepted result is answered "duplicate" and changes nothing (I8); the
  outcome is emitted again when the session is on the calling process (a lost reply must never lose
  an outcome; the session ignores one it already has).

  Input:
    KEYS[1] cell node registry "<base>nodes"
    KEYS[2] job hash           "<base>job:<job_id>"
    ARGV[1] calling process id
    ARGV[2] job_id
    ARGV[3] node_id (the sender)
    ARGV[4] attempt_id (as sent by the node)
    ARGV[5] outcome: "completed" | "completed_empty" | "failed" | "refused"
    ARGV[6] error code (for "failed"; "" otherwise)
    ARGV[7] result payload for the client (JSON), carried with the outcome
  Output: [body, effects, payloads...], body {status, state, reason?, now}
    status "completed" | "refused" | "duplicate" | "rejected" (reason "unknown_job" | "stale" | "not_active")
]]
--- @include "includes/keys"
--- @include "includes/context"
--- @include "includes/nodes"
--- @include "includes/jobs"

local base = base_of(KEYS[1])
local jid, nid, outcome, code = ARGV[2], ARGV[3], ARGV[5], ARGV[6]
if KEYS[2] ~= k_job(base, jid) then error('ERR dragoman: job key does not match job_id') end
local attempt = need_number(ARGV[4], 'attempt_id')
if outcome ~= 'completed' and outcome ~= 'completed_empty' and outcome ~= 'failed' and outcome ~= 'refused' then
  error('ERR dragoman: outcome must be completed, completed_empty, failed or refused')
end
if outcome == 'failed' and code == '' then code = 'PROCESSING_ERROR' end
if outcome == 'completed' or outcome == 'completed_empty' then code = '' end
local payload = ARGV[7]

local ctx = new_context(base, ARGV[1])
local j = job_fields(ctx, jid)
if not j then return reply(ctx, { status = 'rejected', reason = 'unknown_job' }) end
if j.node ~= nid or j.attempt ~= attempt then
  return reply(ctx, { status = 'rejected', reason = 'stale', state = j.state })
end
if TERMINAL[j.state] then
  if j.sproc == ctx.proc then
    local own = payload ~= ''
    local kept = own and nil or rcall('HGET', KEYS[2], 'result')
    emit(ctx, ctx.proc, { kind = 'outcome', job = jid, session = j.session, utt = j.utt, tgt = j.tgt,
      state = j.state, code = rcall('HGET', KEYS[2], 'code') or '', node = j.node, attempt = j.attempt },
      kept or nil, own)
  end
  return reply(ctx, { status = 'duplicate', state = j.state })
end
if not ACTIVE[j.state] then
  return reply(ctx, { status = 'rejected', reason = 'not_active', state = j.state })
end

local n = release_slot(ctx, nid, jid, j.pool)
if outcome == 'refused' then
  count(ctx, 'refused')
  log_event(ctx, 'job_refused', { job = jid, node = nid, code = code })
  -- the slot goes to the oldest job already waiting (the refused one is not waiting yet: it never
  -- goes straight back to the node that refused it), then the refused job moves on
  fill_from_queues(ctx, nid, n)
  reassign_or_fail(ctx, jid, j, { [nid] = true }, 'NODE_OVERLOADED')
  return reply(ctx, { status = 'refused', state = j.state })
end
finish_job(ctx, jid, j, outcome, code, payload, true)
fill_after_release(ctx, nid, n)
return reply(ctx, { status = 'completed', state = outcome })
