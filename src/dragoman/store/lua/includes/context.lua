--[[
  The per-call context every transition carries: the cell base, the calling process, the server's
  time (I7: never a scheduler's clock; read once, when first needed), and what the call hands back.

  A reply is an array: [1] the body (JSON), [2] the effects (a JSON array), [3..] payloads. Effects
  are what other parties must hear about (a job to send to a node, a cancel, a job's outcome for a
  session). An effect for a socket held by the calling process comes back in the reply (delivered
  locally, no extra round trip); its payload, if any, is one of the reply's payloads (effect.p is its
  position, -1 meaning "the payload you passed in": never sent back). An effect for a socket held by
  another live process is appended, in this same atomic call, to that process's inbox stream.

  Delivery is bounded and never silently lossy (I10): an inbox holds at most INBOX_MAX_LEN unread
  entries (its reader removes what it has read); when it is full, or the process is gone, emit
  answers false and the caller decides what the job does instead (see jobs.lua). Outcomes are also
  kept with the job until the session acknowledges them, so a session can always ask again.
]]
-- (``rcall`` is redis.call: the library declares it, and binds it as each function starts)
local TEST_CLOCK = {{test_clock}}
local INBOX_MAX_LEN = {{inbox_max_len}}
local REPLY_KEEP_MS = 30000  -- how long a reply is kept for a retry after a lost reply (see replay)

--[[
  Numbers in replies. cjson writes every number through printf's floating-point path, which costs
  about as much as a small command: so the integers of the hot replies go out as JSON strings made
  without printf (the Python side decodes them leniently, string or number): small ones from a
  table made once at load, the time from the digits TIME answers with.
]]
local INT_S = {}
for i = -1, 64 do INT_S[i] = '' .. i end  -- (tostring is not a global at library load)
local function int_s(n)
  return INT_S[n] or n
end

-- The server's time in ms, as a number and as its decimal digits.
local function server_now_ms(base)
  local t = rcall('TIME')
  local us = t[2]
  local ms = #us > 3 and string.sub(us, 1, #us - 3) or '0'
  local now_s = t[1] .. string.rep('0', 3 - #ms) .. ms
  local now = now_s + 0
  -- Test builds only: an offset the tests use to run past deadlines (production scripts skip it).
  if TEST_CLOCK then
    now = now + (tonumber(rcall('GET', k_clock(base)) or '0') or 0)
    now_s = string.format('%d', now)
  end
  return now, now_s
end

-- ``ctx.now`` reads the clock on first use, once per call: a call whose decisions need no time (a
-- result with nothing queued behind it) costs no TIME command. ``ctx.now_s``: its digits.
local CONTEXT = { __index = function(ctx, key)
  if key ~= 'now' and key ~= 'now_s' then return nil end
  local now, now_s = server_now_ms(ctx.base)
  rawset(ctx, 'now', now)
  rawset(ctx, 'now_s', now_s)
  return rawget(ctx, key)
end }

local function new_context(base, proc)
  return setmetatable({ base = base, proc = proc, effects = {}, payloads = {} }, CONTEXT)
end

-- A process is alive while its registration (renewed every third of proc_ttl_ms) has not lapsed.
local function proc_alive(ctx, proc)
  local deadline = rcall('ZSCORE', k_procs(ctx.base), proc)
  return deadline ~= false and deadline ~= nil and tonumber(deadline) >= ctx.now
end

local function emit(ctx, target, effect, payload, own)
  if target == nil or target == false or target == '' then return false end
  if target == ctx.proc then
    if own then
      effect.p = INT_S[-1]
    elseif payload then
      local payloads = ctx.payloads
      payloads[#payloads + 1] = payload
      effect.p = int_s(#payloads)
    end
    ctx.effects[#ctx.effects + 1] = effect
    return true
  end
  -- (a process that is not registered is dead: its sockets, and whoever would hear this, are gone)
  if not proc_alive(ctx, target) then return false end
  local key = k_inbox(ctx.base, target)
  if rcall('XLEN', key) >= INBOX_MAX_LEN then
    rcall('HINCRBY', k_stats(ctx.base), 'inbox_full', 1)
    return false
  end
  if payload then
    rcall('XADD', key, '*', 'e', cjson.encode(effect), 'r', payload)
  else
    rcall('XADD', key, '*', 'e', cjson.encode(effect))
  end
  return true
end

-- Recent notable events (reassignments, failures, nodes joining and leaving) for operators.
local function log_event(ctx, kind, fields)
  local args = { 'XADD', k_events(ctx.base), 'MAXLEN', '~', 1000, '*', 'kind', kind, 'at', ctx.now }
  for k, v in pairs(fields) do
    table.insert(args, k)
    table.insert(args, tostring(v))
  end
  rcall(unpack(args))
end

local function count(ctx, name, n)
  rcall('HINCRBY', k_stats(ctx.base), name, n or 1)
end

-- Append a field and its value to a list of pairs (for an HSET whose fields vary).
local function put(list, field, value)
  local m = #list
  list[m + 1] = field
  list[m + 2] = value
end

local function split_words(s)
  local out = {}
  if s then
    for w in string.gmatch(s, '%S+') do table.insert(out, w) end
  end
  return out
end

local function word_set(s)
  local set = {}
  if s and s ~= '' then
    for w in string.gmatch(s, '%S+') do set[w] = true end
  end
  return set
end

local function reply(ctx, body)
  body.now = rawget(ctx, 'now_s')  -- (the time the call used; none when it needed none)
  local out = { cjson.encode(body), (#ctx.effects > 0) and cjson.encode(ctx.effects) or '[]' }
  for _, p in ipairs(ctx.payloads) do table.insert(out, p) end
  if ctx.call_id and ctx.call_id ~= '' and (#ctx.effects > 0 or ctx.keep_always) then
    rcall('SET', k_reply(ctx.base, ctx.call_id), cjson.encode(out), 'PX', REPLY_KEEP_MS)
  end
  return out
end

--[[
  A lost reply (a timeout or a dropped connection after the script ran) must not lose the effects it
  carried for the caller's own sockets. Scripts whose repeat could not recompute them keep their
  reply (when it carried effects) for a short while under the call's id; the caller's retry, with
  the same id, gets it again. ``always``: keep it even without effects, for a script whose repeat
  would answer differently (room-3: a repeated create is a "collision", a repeated join
  ALREADY_IN_ROOM) or would emit to another process's inbox again.
  (dispatch_task and complete_task need no such copy: a repeat answers "exists"/"duplicate" and
  emits the local effect again.)
]]
local function replay(ctx, call_id, always)
  if call_id == nil or call_id == '' then return nil end
  ctx.call_id = call_id
  ctx.keep_always = always
  local kept = rcall('GET', k_reply(ctx.base, call_id))
  if kept then return cjson.decode(kept) end
  return nil
end

-- Every script names its cell through KEYS[1] (the cell's node registry "<base>nodes");
-- derived keys are built from that base, so they share its hash slot (I9).
local function base_of(anchor)
  local suffix = 'nodes'
  if string.sub(anchor, -#suffix) ~= suffix then
    error('ERR dragoman: KEYS[1] must be the cell registry key, got ' .. anchor)
  end
  return string.sub(anchor, 1, #anchor - #suffix)
end

-- Arguments are checked before the first write: no script errors after it has changed something.
-- A session's resume point, "next_utt seq skip cutt" (integers, -1 at least), kept as given in one
-- field "resume" of its record: checked whole, by one match.
local function need_resume_point(value)
  local a, b, c, d = string.match(type(value) == 'string' and value or '', '^(%-?%d+) (%-?%d+) (%-?%d+) (%-?%d+)$')
  for _, n in ipairs({ a or '-', b, c, d }) do
    if string.byte(n, 1) == 45 and n ~= '-1' then  -- ('-': below -1, or none)
      error('ERR dragoman: resume point must be "next_utt seq skip cutt", integers >= -1')
    end
  end
  return value
end

-- Written in decimal digits only (a job's spec keeps some as given: see jobs.lua).
local function need_number(value, what, min)
  local n = type(value) == 'string' and string.find(value, '^%-?%d+$') and value + 0
  if not n or n < (min or 0) or n % 1 ~= 0 then  -- (inf % 1 is nan: refused too)
    error('ERR dragoman: ' .. what .. ' must be an integer >= ' .. tostring(min or 0))
  end
  return n
end
