--[[
  A session leaves a cell. "detach": its socket is gone but a client may resume it: it becomes an
  orphan for the grace period (ARGV[5]; 0 abandons it at once). "end": it is over (closed and
  flushed): what is left of it is cancelled and it is forgotten. Either way nothing it was owed
  keeps a slot past its grace: waiting jobs leave their queues, running ones get job_cancel.
  Fenced (I11): only the session's current holder (its epoch) may close it.

  Input:
    KEYS[1] cell node registry "<base>nodes"
    KEYS[2] session record     "<base>sess:<session_id>"
    ARGV[1] calling process id
    ARGV[2] session_id
    ARGV[3] epoch
    ARGV[4] "detach" | "end"
    ARGV[5] grace ms (detach)
    ARGV[6] call id (a retry after a lost reply gets the same reply again)
  Output: [body, effects, payloads...], body {status:"detached"|"ended"|"unknown"|"superseded", jobs, now}
    jobs: how many unfinished jobs were cancelled
]]
--- @include "includes/keys"
--- @include "includes/context"
--- @include "includes/nodes"
--- @include "includes/jobs"
--- @include "includes/sessions"

local base = base_of(KEYS[1])
local sid, mode = ARGV[2], ARGV[4]
if sid == '' or KEYS[2] ~= k_sess(base, sid) then error('ERR dragoman: session key does not match session_id') end
if mode ~= 'detach' and mode ~= 'end' then error('ERR dragoman: mode must be detach or end') end
local epoch = need_number(ARGV[3], 'epoch')
local grace = need_number(ARGV[5], 'grace_ms')
local ctx = new_context(base, ARGV[1])
local again = replay(ctx, ARGV[6])
if again then return again end
local current = tonumber(rcall('HGET', KEYS[2], 'epoch') or '')
if not current then return reply(ctx, { status = 'unknown', jobs = 0 }) end
if current > epoch then return reply(ctx, { status = 'superseded', jobs = 0 }) end
if mode == 'detach' and grace > 0 then
  session_orphan(ctx, sid, grace)
  return reply(ctx, { status = 'detached', jobs = 0 })
end
local cancelled = session_abandon(ctx, sid, mode == 'end' and 'session_closed' or 'session_gone')
return reply(ctx, { status = mode == 'end' and 'ended' or 'detached', jobs = math.max(cancelled, 0) })
