--[[
  Sessions have delivered these jobs' outcomes to their clients: they are no longer owed, and the
  jobs (with their kept results) are forgotten (a room job once every listener has it). A job that
  has not ended is left as it is. Retry-safe (I8): a listener's ack of a room job counts once (the
  job remembers it as "acked:<session>"), so a repeat cannot forget the job before the other
  listeners have it; an ack from a session that is not one of its listeners does not count.

  A session names apart the jobs it knows to have ended and to be its own (not room jobs): those
  whose outcome it was given, which only an ended job has. They are forgotten without a look at
  them (a read per job saved on every utterance); the others are read first, as above. (A job
  named there that in fact still runs is forgotten all the same: its holder's result is then
  refused, and the reaper gives back the slot of a job that is gone: see reap.)

  One call takes the acks of many sessions of the cell (a process collects them for a moment: see
  Store.ack), so that under a light load acks do not cost a script call per session each; each
  session's record loses its fields in one HDEL, and the forgotten jobs go in one DEL.

  Input:
    KEYS[1] cell node registry "<base>nodes"
    ARGV[1] calling process id
    ARGV[2..] groups, one per session: session_id, n, m, then n job ids (read first), then m ids of
              the session's own jobs that have ended (forgotten unread)
  Output: [body, effects], body {status:"ok", acked: [count per group], now}
]]
--- @include "includes/keys"
--- @include "includes/context"
--- @include "includes/nodes"
--- @include "includes/jobs"

local base = base_of(KEYS[1])
-- the groups are checked whole before anything changes
local groups = {}
local i = 2
while i <= #ARGV do
  local sid = ARGV[i]
  if sid == '' then error('ERR dragoman: session_id must not be empty') end
  local n = need_number(ARGV[i + 1], 'job count')
  local m = need_number(ARGV[i + 2], 'ended job count')
  if i + 2 + n + m > #ARGV then error('ERR dragoman: session ' .. sid .. ' names fewer job ids than its counts') end
  groups[#groups + 1] = { sid = sid, first = i + 3, last = i + 2 + n, ended = i + 2 + n + m }
  i = i + 3 + n + m
end
local ctx = new_context(base, ARGV[1])

local function is_listener(listeners, sid)
  local found = false
  each_listener(listeners, function(lsid) if lsid == sid then found = true end end)
  return found
end

-- (a command takes the names in slices: unpack is bounded by Lua's stack)
local function in_slices(cmd, key, names)
  for s = 1, #names, 1000 do
    local e = math.min(s + 999, #names)
    if key then rcall(cmd, key, unpack(names, s, e)) else rcall(cmd, unpack(names, s, e)) end
  end
end

local acked, forget = {}, {}
for g, group in ipairs(groups) do
  local sid, owed, count = group.sid, {}, 0
  for a = group.first, group.last do
    local jid = ARGV[a]
    local jk = k_job(base, jid)
    local f = rcall('HMGET', jk, 'state', 'listeners')
    local state, listeners = f[1], f[2] or ''
    if not state or TERMINAL[state] then
      if listeners ~= '' then
        -- a room job: forgotten when the last of its listeners has it
        if is_listener(listeners, sid) and rcall('HSETNX', jk, 'acked:' .. sid, '1') == 1
            and rcall('HINCRBY', jk, 'acks_left', -1) <= 0 then
          forget[#forget + 1] = jk
        end
      elseif state then
        forget[#forget + 1] = jk
      end
      owed[#owed + 1] = 'j:' .. jid
      count = count + 1
    end
  end
  for a = group.last + 1, group.ended do
    local jid = ARGV[a]
    forget[#forget + 1] = k_job(base, jid)
    owed[#owed + 1] = 'j:' .. jid
    count = count + 1
  end
  in_slices('HDEL', k_sess(base, sid), owed)
  acked[g] = count
end
in_slices('DEL', nil, forget)
return reply(ctx, { status = 'ok', acked = (#groups > 0) and acked or nil })
