--[[
  The node confirmed it runs the job (job_ack / job_started): assigned -> running. Fenced like a
  result; optional for nodes (the existing worker never sends it), so nothing else depends on it.

  Input:
    KEYS[1] cell node registry "<base>nodes"
    KEYS[2] job hash           "<base>job:<job_id>"
    ARGV[1] calling process id
    ARGV[2] job_id
    ARGV[3] node_id
    ARGV[4] attempt_id
  Output: [body, effects], body {status:"running"|"rejected", state, now}
]]
--- @include "includes/keys"
--- @include "includes/context"
--- @include "includes/nodes"
--- @include "includes/jobs"

local base = base_of(KEYS[1])
local jid, nid = ARGV[2], ARGV[3]
if KEYS[2] ~= k_job(base, jid) then error('ERR dragoman: job key does not match job_id') end
local attempt = need_number(ARGV[4], 'attempt_id')
local ctx = new_context(base, ARGV[1])
local j = job_fields(ctx, jid)
if not j or j.node ~= nid or j.attempt ~= attempt then
  return reply(ctx, { status = 'rejected', state = j and j.state or '' })
end
if j.state == 'assigned' then
  rcall('HSET', KEYS[2], 'state', 'running', 'started', ctx.now)
  j.state = 'running'
end
if j.state ~= 'running' then return reply(ctx, { status = 'rejected', state = j.state }) end
return reply(ctx, { status = 'running', state = 'running' })
