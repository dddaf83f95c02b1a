--[[
  A session's record in a cell: open it, take it over (resume), or record its resume point.

  "open": a new session on the calling process (epoch 1). Its home cell's record keeps its settings.
  "resume": the calling process takes the session over (a client came back after losing its socket
  or its scheduler process): the epoch goes up (the old holder, if alive, is told it is superseded
  and may no longer dispatch or close it), outcomes of its jobs now come to the caller, and the
  reply lists every job it is still owed: for a finished one with its kept result, for one that is
  still running its state, and for one Redis no longer knows, "missing".
  "commit": record the resume point (see dispatch_task), when the session's last dispatch of an
  utterance went to another cell.
  "reclaim": the holder is alive but Redis lost the record or declared the holder dead (a stall):
  the session is live on the caller again, at the caller's epoch (never over a newer holder).

  Input:
    KEYS[1] cell node registry "<base>nodes"
    KEYS[2] session record     "<base>sess:<session_id>"
    ARGV[1] calling process id
    ARGV[2] session_id
    ARGV[3] "open" | "resume" | "commit" | "reclaim"
    ARGV[4] open, reclaim: the session's settings (JSON); commit: the epoch
    ARGV[5] commit: "next_utt seq skip cutt"; reclaim: the epoch
    ARGV[6] call id (a retry after a lost reply gets the same reply again)
  Output: [body, effects, payloads...], body {status, epoch, spec, next_utt, seq, skip, cutt, jobs, now}
    status "opened" | "exists" | "resumed" | "unknown" | "committed" | "superseded"
    jobs: [{job, state, utt, tgt, code, node, attempt, p}] (p: payload index of a finished job's result)
]]
--- @include "includes/keys"
--- @include "includes/context"
--- @include "includes/nodes"
--- @include "includes/jobs"

local base = base_of(KEYS[1])
local sid, mode = ARGV[2], ARGV[3]
if sid == '' or KEYS[2] ~= k_sess(base, sid) then error('ERR dragoman: session key does not match session_id') end
if mode ~= 'open' and mode ~= 'resume' and mode ~= 'commit' and mode ~= 'reclaim' then
  error('ERR dragoman: mode must be open, resume, commit or reclaim')
end
local ctx = new_context(base, ARGV[1])
local again = replay(ctx, ARGV[6])
if again then return again end
local sk = KEYS[2]

if mode == 'open' then
  if rcall('EXISTS', sk) == 1 then return reply(ctx, { status = 'exists' }) end
  rcall('HSET', sk, 'proc', ctx.proc, 'epoch', 1, 'state', 'live', 'spec', ARGV[4], 'resume', '0 0 0 -1',
    'opened', ctx.now)
  rcall('SADD', k_proc_sessions(base, ctx.proc), sid)
  return reply(ctx, { status = 'opened', epoch = 1 })
end

if mode == 'reclaim' then
  local epoch = need_number(ARGV[5], 'epoch')
  local current = tonumber(rcall('HGET', sk, 'epoch') or '')
  if current and current > epoch then return reply(ctx, { status = 'superseded' }) end
  local old = rcall('HGET', sk, 'proc')
  if old and old ~= '' and old ~= ctx.proc then rcall('SREM', k_proc_sessions(base, old), sid) end
  if not current then
    rcall('HSET', sk, 'spec', ARGV[4], 'resume', '-1 0 0 -1', 'opened', ctx.now)
  end
  rcall('HSET', sk, 'proc', ctx.proc, 'epoch', epoch, 'state', 'live')
  rcall('HDEL', sk, 'orphan_at')
  rcall('ZREM', k_orphans(base), sid)
  rcall('SADD', k_proc_sessions(base, ctx.proc), sid)
  return reply(ctx, { status = 'opened', epoch = epoch })
end

if mode == 'commit' then
  local epoch = need_number(ARGV[4], 'epoch')
  local point = need_resume_point(ARGV[5])
  local current = tonumber(rcall('HGET', sk, 'epoch') or '')
  if not current then return reply(ctx, { status = 'unknown' }) end
  if current > epoch then return reply(ctx, { status = 'superseded' }) end
  rcall('HSET', sk, 'resume', point)
  return reply(ctx, { status = 'committed' })
end

local fields = rcall('HGETALL', sk)
if #fields == 0 then return reply(ctx, { status = 'unknown' }) end
local rec, jids = {}, {}
for i = 1, #fields, 2 do
  local f = fields[i]
  if string.sub(f, 1, 2) == 'j:' then table.insert(jids, string.sub(f, 3)) else rec[f] = fields[i + 1] end
end
local epoch = (tonumber(rec.epoch) or 0) + 1
local old = rec.proc or ''
if old ~= '' then
  emit(ctx, old, { kind = 'superseded', session = sid })
  if old ~= ctx.proc then rcall('SREM', k_proc_sessions(base, old), sid) end
end
rcall('HSET', sk, 'proc', ctx.proc, 'epoch', epoch, 'state', 'live')
rcall('HDEL', sk, 'orphan_at')
rcall('ZREM', k_orphans(base), sid)
rcall('SADD', k_proc_sessions(base, ctx.proc), sid)

local owed = {}
for _, jid in ipairs(jids) do
  local j = job_fields(ctx, jid)
  if not j then
    table.insert(owed, { job = jid, state = 'missing' })
  else
    local item = { job = jid, state = j.state, utt = j.utt, tgt = j.tgt, node = j.node, attempt = j.attempt }
    if TERMINAL[j.state] then
      local kept = rcall('HMGET', k_job(base, jid), 'code', 'result')
      item.code = kept[1] or ''
      if kept[2] then
        table.insert(ctx.payloads, kept[2])
        item.p = #ctx.payloads
      end
    else
      rcall('HSET', k_job(base, jid), 'sproc', ctx.proc)
    end
    table.insert(owed, item)
  end
end
count(ctx, 'sessions_resumed')
-- (a record written before the resume point was one field holds it in four: a rolling upgrade)
local point = rec.resume and split_words(rec.resume) or { rec.next_utt, rec.seq, rec.skip, rec.cutt }
return reply(ctx, { status = 'resumed', epoch = epoch, spec = rec.spec or '', next_utt = tonumber(point[1]) or -1,
  seq = tonumber(point[2]) or 0, skip = tonumber(point[3]) or 0, cutt = tonumber(point[4]) or -1,
  jobs = (#owed > 0) and owed or nil })
