--[[
  The per-call context every transition carries: the cell base, the calling process, the server's
  time (I7: never a scheduler's clock), and the effects to hand back.

  Effects are what other parties must hear about (a job to send to a node, a cancel, a job's outcome
  for a session). An effect for a socket held by the calling process is returned to it (delivered
  locally, no extra round trip); any other is appended, in this same atomic call, to the inbox
  stream of the process holding that socket. If the caller dies before delivering a local effect,
  its socket died with it: nobody is left to tell, and leases recover the work.
]]
local rcall = redis.call

local function server_now_ms(base)
  local t = rcall('TIME')
  -- The clock offset exists for tests that advance time; it is 0 in production.
  local offset = tonumber(rcall('GET', k_clock(base)) or '0') or 0
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + offset
end

local function new_context(base, proc)
  return { base = base, proc = proc, now = server_now_ms(base), effects = {} }
end

-- Inbox entries can carry audio or results: keep each stream short. A reader that falls this
-- far behind loses the oldest effects, which the lease rules then recover.
local INBOX_MAXLEN = 1000

local function emit(ctx, target_proc, effect, payload)
  if target_proc == nil or target_proc == false or target_proc == '' or target_proc == ctx.proc then
    table.insert(ctx.effects, effect)
  elseif rcall('ZSCORE', k_procs(ctx.base), target_proc) then
    -- (a process that is not registered is dead: its sockets, and whoever would hear this, are gone)
    local key = k_inbox(ctx.base, target_proc)
    if payload then
      rcall('XADD', key, 'MAXLEN', '~', INBOX_MAXLEN, '*', 'e', cjson.encode(effect), 'r', payload)
    else
      rcall('XADD', key, 'MAXLEN', '~', INBOX_MAXLEN, '*', 'e', cjson.encode(effect))
    end
  end
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

local function split_words(s)
  local out = {}
  if s then
    for w in string.gmatch(s, '%S+') do table.insert(out, w) end
  end
  return out
end

local function word_set(s)
  local set = {}
  for _, w in ipairs(split_words(s)) do set[w] = true end
  return set
end

local function reply(ctx, body)
  body.effects = ctx.effects
  body.now = ctx.now
  return cjson.encode(body)
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
