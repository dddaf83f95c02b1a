--[[
  An interim transcript (asr_partial) from a node, relayed to the session of the job it names, on
  whichever process holds that session. Only the holder speaks for a job (I11): the partial is
  relayed only from the node holding the job's current attempt, and only for that job's session and
  utterance; anything else is rejected and changes nothing.

  Input:
    KEYS[1] cell node registry "<base>nodes"
    KEYS[2] job hash           "<base>job:<job_id>"
    ARGV[1] calling process id
    ARGV[2] job_id
    ARGV[3] node_id (the sender)
    ARGV[4] session_id named by the node ("" if none)
    ARGV[5] utterance_index named by the node ("" if none)
    ARGV[6] the partial (JSON) for the client
  Output: [body, effects, payloads...], body {status:"relayed"|"rejected", reason?, now}
]]
--- @include "includes/keys"
--- @include "includes/context"
--- @include "includes/nodes"
--- @include "includes/jobs"

local base = base_of(KEYS[1])
local jid, nid = ARGV[2], ARGV[3]
if KEYS[2] ~= k_job(base, jid) then error('ERR dragoman: job key does not match job_id') end
local ctx = new_context(base, ARGV[1])
local j = job_fields(ctx, jid)
if not j then return reply(ctx, { status = 'rejected', reason = 'unknown_job' }) end
if j.node ~= nid or not ACTIVE[j.state] then return reply(ctx, { status = 'rejected', reason = 'not_holder' }) end
if (ARGV[4] ~= '' and ARGV[4] ~= j.session) or (ARGV[5] ~= '' and tonumber(ARGV[5]) ~= tonumber(j.utt)) then
  return reply(ctx, { status = 'rejected', reason = 'not_this_job' })
end
emit(ctx, j.sproc, { kind = 'partial', job = jid, session = j.session, utt = j.utt, tgt = j.tgt, node = nid }, ARGV[6])
return reply(ctx, { status = 'relayed' })
