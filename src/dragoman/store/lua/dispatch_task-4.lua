--[[
  Create a job and place it: on the session's previous node in the pool while it has a free slot,
  else on the node with the most free slots; with no free slot, in the pool's bounded queue; with
  no node serving the pool at all, fail it at once with NO_AVAILABLE_NODE (unless the cell's data is
  younger than the warm-up, or the pool lost its last node less than the warm-up ago: right after
  Redis lost its data or a scheduler process died, nodes are registering again, so the job waits in
  the queue instead). One call does pool choice, node choice, slot taking, and the
  session's bookkeeping (the job is owed to it; its affinity; its resume point).

  Retry-safe (I8): a job id the session has seen is answered with its current state and nothing
  changes (no second slot); if its assignment was for a node of the calling process, the assign
  effect comes again (a lost reply must not lose it; the node side ignores a repeat).
  Fenced (I11): a session whose record has a newer epoch (resumed elsewhere) is answered "superseded".

  Input:
    KEYS[1] cell node registry "<base>nodes"
    KEYS[2] job hash           "<base>job:<job_id>"
    KEYS[3] pool zset          "<base>pool:<pool_id>" (node_id -> free slots)
    KEYS[4] session record     "<base>sess:<session_id>"
    ARGV[1]  calling process id
    ARGV[2]  job_id
    ARGV[3]  pool_id
    ARGV[4]  session_id
    ARGV[5]  utterance_index
    ARGV[6]  tgt_lang
    ARGV[7]  job_timeout_ms (the lease from each assignment)
    ARGV[8]  pending_timeout_ms (longest wait in the queue)
    ARGV[9]  queue_max (per pool)
    ARGV[10] max_attempts
    ARGV[11] nodes to avoid if another can take it, space separated (soft)
    ARGV[12] process holding the session's socket (where the outcome goes)
    ARGV[13] session epoch
    ARGV[14] job body (encoded JobAssignBody: the job_assign without job_id and attempt_id)
    ARGV[15] mode: "" place, queue or fail; "place_only" assign if a node is free, else change
             nothing and answer "no_capacity" (used to try one cell before the next)
    ARGV[16] resume point to record in the session, "" for none: "next_utt seq skip cutt"
    ARGV[17] warm-up ms (see above)
    ARGV[18] room listeners, "session@process ...", "" for none: a room job's outcome goes to each
             listener (each is first told to expect it, with the job's pool: the speaker's
             languages, which the listener does not know), not to the speaking session, and it is
             not the speaker's to keep: it is forgotten once every listener acknowledged it
  Output: [body, effects, payloads...], body {status, state, node, attempt, code, now}
    status "assigned" | "queued" | "failed" (code NO_AVAILABLE_NODE, or NODE_OVERLOADED: queue full)
         | "exists" (seen before: its current state, "gone" once acknowledged) | "no_capacity"
         | "superseded"
]]
--- @include "includes/keys"
--- @include "includes/context"
--- @include "includes/nodes"
--- @include "includes/jobs"

local base = base_of(KEYS[1])
local jid, pid, sid = ARGV[2], ARGV[3], ARGV[4]
if jid == '' or KEYS[2] ~= k_job(base, jid) then error('ERR dragoman: job key does not match job_id') end
if pid == '' or KEYS[3] ~= k_pool(base, pid) then error('ERR dragoman: pool key does not match pool_id') end
if sid == '' or KEYS[4] ~= k_sess(base, sid) then error('ERR dragoman: session key does not match session_id') end
-- The numbers: one match checks them all (a dispatch's checks cost more than its session write); only
-- when it fails is each checked on its own, so that the error names the one refused.
local nums = (ARGV[5] or '') .. ' ' .. (ARGV[7] or '') .. ' ' .. (ARGV[8] or '') .. ' ' .. (ARGV[9] or '') .. ' ' ..
  (ARGV[10] or '') .. ' ' .. (ARGV[13] or '') .. ' ' .. (ARGV[17] or '')
if #nums > 100 or not string.find(nums, '^%d+ [1-9]%d* [1-9]%d* %d+ [1-9]%d* %d+ %d+$') then
  need_number(ARGV[5], 'utterance_index')
  need_number(ARGV[7], 'job_timeout_ms', 1)
  need_number(ARGV[8], 'pending_timeout_ms', 1)
  need_number(ARGV[9], 'queue_max')
  need_number(ARGV[10], 'max_attempts', 1)
  need_number(ARGV[13], 'epoch')
  need_number(ARGV[17], 'warmup_ms')
end
local utt, job_timeout, epoch = ARGV[5], tonumber(ARGV[7]), tonumber(ARGV[13])  -- (utt: sent on as given)
local commit = ARGV[16] ~= '' and need_resume_point(ARGV[16]) or nil
if ARGV[12] == '' then error('ERR dragoman: the session process must be named') end
-- (they go into the job's spec, space separated)
if not string.find(pid .. ' ' .. sid .. ' ' .. ARGV[6], '^%S+ %S+ %S+$') then
  error('ERR dragoman: pool_id, session_id and tgt_lang must be words (no spaces)')
end

local ctx = new_context(base, ARGV[1])
local sk = KEYS[4]
local s = rcall('HMGET', sk, 'epoch', 'proc', 'a:' .. pid, 'j:' .. jid)
if s[1] and tonumber(s[1]) > epoch then return reply(ctx, { status = 'superseded' }) end

local listeners = ARGV[18] or ''
if s[4] or (listeners ~= '' and rcall('EXISTS', KEYS[2]) == 1) then  -- (a room job is not the session's)
  local j = job_fields(ctx, jid)
  if not j then return reply(ctx, { status = 'exists', state = 'gone' }) end
  if ACTIVE[j.state] then
    local n = node_fields(ctx, j.node)
    if n and n.proc == ctx.proc then
      ctx.own_job = jid
      emit(ctx, ctx.proc, { kind = 'assign', job = jid, node = j.node, attempt = j.attempt, session = sid,
        utt = j.utt, tgt = j.tgt, lease = tonumber(rcall('HGET', KEYS[2], 'lease')) or 0 }, nil, true)
    end
  end
  return reply(ctx, { status = 'exists', state = j.state, node = j.node, attempt = j.attempt,
    code = rcall('HGET', KEYS[2], 'code') or '' })
end

local place_only = ARGV[15] == 'place_only'
local avoid = word_set(ARGV[11])
local n = pick_node(ctx, pid, s[3] or nil, avoid)
-- a node whose process cannot hear of it now (gone, or its inbox full) is skipped; with none left,
-- the job waits in the queue like any job that finds no free slot
local exclude = nil
for _ = 1, 8 do
  if not n or reachable(ctx, n.proc) then break end
  exclude = exclude or {}
  exclude[n.id] = true
  count(ctx, 'unreachable')
  n = pick_node(ctx, pid, nil, avoid, exclude)
end
if place_only and not n then return reply(ctx, { status = 'no_capacity' }) end

-- The session's part, in one HSET: the job is owed to it (a room job is not: it is the listeners'),
-- its process and epoch (new, or moved), its resume point, its node in this pool.
local sess = {}
if listeners == '' then put(sess, 'j:' .. jid, '1') end
if not s[1] or s[2] ~= ARGV[12] then
  put(sess, 'proc', ARGV[12])
  put(sess, 'epoch', epoch)
  put(sess, 'state', 'live')
  rcall('SADD', k_proc_sessions(base, ARGV[12]), sid)
end
if commit then put(sess, 'resume', commit) end
if n and n.id ~= s[3] then put(sess, 'a:' .. pid, n.id) end  -- (unchanged: not written again)
if #sess > 0 then rcall('HSET', sk, unpack(sess)) end

ctx.own_job, ctx.own_payload = jid, ARGV[14]
local spec = make_spec(pid, sid, ARGV[5], ARGV[6], ARGV[10], ARGV[7], ARGV[8], ARGV[9], ctx.now)
-- (its other limits are read from its spec if it comes to a queue: see LATER_READ)
local j = setmetatable({
  key = KEYS[2], state = 'new', node = '', attempt = 0, pool = pid, session = sid, utt = utt, tgt = ARGV[6],
  spec = spec, sproc = ARGV[12], job_timeout = job_timeout, tried = '', listeners = listeners,
}, LATER_READ)
-- listeners learn of the job before anything can end it, through the same channel as its outcome
if listeners ~= '' then
  each_listener(listeners, function(lsid, lproc)
    emit(ctx, lproc, { kind = 'expect', job = jid, session = lsid, speaker = sid, utt = utt, tgt = ARGV[6], pool = pid })
  end)
end
-- The job's write-once fields (its spec, see jobs.lua), written with its first state. A room job
-- also counts the acknowledgements it waits for (see ack_outcomes).
local creation = { 'data', ARGV[14], 'spec', spec, 'sproc', ARGV[12] }
if listeners ~= '' then
  put(creation, 'listeners', listeners)
  put(creation, 'acks_left', #split_words(listeners))
end

local code = ''
if n then
  assign_job(ctx, jid, j, n, creation, true)
else
  -- Not placed: the job waits in the queue, or fails at once (keeping no audio); no attempt yet.
  put(creation, 'attempt', 0)
  if rcall('ZCARD', KEYS[3]) == 0 and not warming_up(ctx, pid, tonumber(ARGV[17])) then
    code = 'NO_AVAILABLE_NODE'
  elseif not enqueue_job(ctx, jid, j, creation) then
    code = 'NODE_OVERLOADED'
  end
  if code ~= '' then  -- (creation after its first pair, the audio)
    finish_job(ctx, jid, j, 'failed', code, nil, false, { 'node', '', unpack(creation, 3) })
  end
end
return reply(ctx, { status = j.state, state = j.state, node = j.node, attempt = int_s(j.attempt), code = code })
