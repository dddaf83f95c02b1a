--[[
  A session has delivered these jobs' outcomes to its client: they are no longer owed, and the jobs
  (with their kept results) are forgotten (a room job once every listener has it). A job that has
  not ended is left as it is. Retry-safe (I8): a listener's ack of a room job counts once (the job
  remembers it as "acked:<session>"), so a repeat cannot forget the job before the other listeners
  have it; an ack from a session that is not one of its listeners does not count.

  Input:
    KEYS[1] cell node registry "<base>nodes"
    KEYS[2] session record     "<base>sess:<session_id>"
    ARGV[1] calling process id
    ARGV[2] session_id
    ARGV[3..] job ids
  Output: [body, effects], body {status:"ok", acked, now}
]]
--- @include "includes/keys"
--- @include "includes/context"
--- @include "includes/nodes"
--- @include "includes/jobs"

local base = base_of(KEYS[1])
if ARGV[2] == '' or KEYS[2] ~= k_sess(base, ARGV[2]) then error('ERR dragoman: session key does not match session_id') end
local ctx = new_context(base, ARGV[1])
local acked = 0

local function is_listener(listeners, sid)
  local found = false
  each_listener(listeners, function(lsid) if lsid == sid then found = true end end)
  return found
end

for i = 3, #ARGV do
  local jk = k_job(base, ARGV[i])
  local f = rcall('HMGET', jk, 'state', 'listeners')
  local state, listeners = f[1], f[2] or ''
  if not state or TERMINAL[state] then
    if listeners ~= '' then
      -- a room job: forgotten when the last of its listeners has it
      if is_listener(listeners, ARGV[2]) and rcall('HSETNX', jk, 'acked:' .. ARGV[2], '1') == 1
          and rcall('HINCRBY', jk, 'acks_left', -1) <= 0 then
        rcall('DEL', jk)
      end
    elseif state then
      rcall('DEL', jk)
    end
    rcall('HDEL', KEYS[2], 'j:' .. ARGV[i])
    acked = acked + 1
  end
end
return reply(ctx, { status = 'ok', acked = acked })
