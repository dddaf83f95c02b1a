--[[
  Create a job and place it: on the session's previous node in the pool while it has a free slot,
  else on the node with the most free slots; with no free slot, in the pool's bounded queue; with
  no node serving the pool at all, fail it at once with NO_AVAILABLE_NODE. One call does pool
  choice, node choice and slot taking. Retry-safe (I8): a job id that exists is answered with its
  current state and nothing changes (no second slot).

  Input:
    KEYS[1] cell node registry "<base>nodes"
    KEYS[2] job hash           "<base>job:<job_id>"
    KEYS[3] pool zset          "<base>pool:<pool_id>" (node_id -> free slots)
    KEYS[4] job data           "<base>jobdata:<job_id>" (the job_assign body, for redelivery)
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
    ARGV[11] job_ttl_ms (how long the finished job stays readable)
    ARGV[12] nodes to avoid if another can take it, space separated (soft)
    ARGV[13] process holding the session's socket (where the outcome goes)
    ARGV[14] job data (job_assign JSON without attempt_id)
    ARGV[15] mode: "" place, queue or fail; "place_only" assign if a node is free, else change
             nothing and answer "no_capacity" (used to try one cell before the next)
  Output: JSON {status, state, node, attempt, code, effects, now}
    status "assigned" | "queued" | "failed" (code NO_AVAILABLE_NODE or NODE_OVERLOADED: queue full)
         | "exists" (job seen before: state/node/attempt/code are its current ones)
]]
--- @include "includes/keys"
--- @include "includes/context"
--- @include "includes/slots"
--- @include "includes/select"
--- @include "includes/jobs"

local base = base_of(KEYS[1])
local jid, pid, sid = ARGV[2], ARGV[3], ARGV[4]
if jid == '' or KEYS[2] ~= k_job(base, jid) or KEYS[4] ~= k_jobdata(base, jid) then
  error('ERR dragoman: job key does not match job_id')
end
if pid == '' or KEYS[3] ~= k_pool(base, pid) then error('ERR dragoman: pool key does not match pool_id') end
local nums = {}
for _, i in ipairs({ 5, 7, 8, 9, 10, 11 }) do
  nums[i] = tonumber(ARGV[i])
  if not nums[i] or nums[i] < 0 then error('ERR dragoman: ARGV[' .. i .. '] must be a number >= 0') end
end

local ctx = new_context(base, ARGV[1])
local place_only = ARGV[15] == 'place_only'
if rcall('EXISTS', KEYS[2]) == 1 then
  local existing = job_fields(ctx, jid)
  local code = rcall('HGET', KEYS[2], 'code') or ''
  return reply(ctx, { status = 'exists', state = existing.state, node = existing.node,
    attempt = existing.attempt, code = code })
end

local affinity = rcall('HGET', k_affinity(base, sid), pid)
local nid = nil
if rcall('ZCARD', KEYS[3]) > 0 then nid = pick_node(ctx, KEYS[3], affinity, word_set(ARGV[12])) end
if place_only and not nid then return reply(ctx, { status = 'no_capacity' }) end

local ttl = nums[11]
-- the record (nothing expires it while the job lives: finish_job sets its lifetime)
local j = {
  state = 'new', node = '', attempt = 0, pool = pid, session = sid, utt = nums[5], tgt = ARGV[6],
  sproc = ARGV[13], max_attempts = math.max(1, nums[10]), job_timeout = nums[7], pending_timeout = nums[8],
  queue_max = nums[9], tried = '', ttl = ttl,
}
rcall('HSET', KEYS[2], 'id', jid, 'state', j.state, 'pool', pid, 'session', sid, 'utt', j.utt,
  'tgt', j.tgt, 'sproc', j.sproc, 'node', '', 'attempt', 0, 'max_attempts', j.max_attempts,
  'job_timeout', j.job_timeout, 'pending_timeout', j.pending_timeout, 'queue_max', j.queue_max,
  'tried', '', 'ttl', ttl, 'created', ctx.now, 'code', '')
rcall('HINCRBY', k_stats(base), 'dispatched', 1)

if not nid and rcall('ZCARD', KEYS[3]) == 0 then
  finish_job(ctx, jid, j, 'failed', 'NO_AVAILABLE_NODE')
  return reply(ctx, { status = 'failed', state = 'failed', code = 'NO_AVAILABLE_NODE' })
end

rcall('SET', KEYS[4], ARGV[14], 'PX', ttl)
if nid then
  assign_job(ctx, jid, j, nid)
  return reply(ctx, { status = 'assigned', state = 'assigned', node = nid, attempt = j.attempt, code = '' })
end
if enqueue_job(ctx, jid, j) then
  return reply(ctx, { status = 'queued', state = 'queued', code = '' })
end
finish_job(ctx, jid, j, 'failed', 'NODE_OVERLOADED')
return reply(ctx, { status = 'failed', state = 'failed', code = 'NODE_OVERLOADED' })
