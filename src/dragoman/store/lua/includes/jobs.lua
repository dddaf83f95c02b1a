--[[
  Job transitions shared by the scripts. States (see dragoman/core/states.py):
    queued -> assigned -> running -> completed | completed_empty | failed
    assigned/running -> queued | assigned (reassignment, attempt + 1) | failed
  finish_job is the only way into a terminal state and emits the job's single outcome (I3). The
  outcome is also kept with the job (field "result") until the session acknowledges it, so a lost
  effect never loses an outcome (I10). The job's audio (field "data") is kept while the job lives,
  for reassignment, and dropped when it ends.

  The three writers take an optional "extra" list of field/value pairs, written in the same HSET:
  dispatch creates a job and places it with one write. Extra fields never include the ones the
  writer sets. (Arguments go to redis.call as written, the extra pairs spread by unpack, never
  copied into an argument table first: on the hot path that copying cost more than the HSET.)
]]
local TERMINAL = { completed = true, completed_empty = true, failed = true }
local ACTIVE = { assigned = true, running = true }

-- Is job ``j`` (job_fields, nil when gone) running on node ``nid`` now, so that a slot there is its?
local function held_by(j, nid)
  return j ~= nil and ACTIVE[j.state] == true and j.node == nid
end

-- A job's write-once fields are one field, "spec": "pool session utt tgt max_attempts job_timeout
-- pending_timeout queue_max created" (no id holds a space). One field written once instead of nine:
-- on the hot path every field of an HSET costs about as much as a small command (make_spec).
local SPEC_HEAD = '^(%S+) (%S+) (%S+) (%S+) '
local SPEC_LATER = '^%S+ %S+ %S+ %S+ (%S+) (%S+) (%S+) (%S+)'

local function make_spec(pid, sid, utt, tgt, max_attempts, job_timeout, pending_timeout, queue_max, created)
  return pid .. ' ' .. sid .. ' ' .. utt .. ' ' .. tgt .. ' ' .. max_attempts .. ' ' .. job_timeout .. ' ' ..
    pending_timeout .. ' ' .. queue_max .. ' ' .. created
end

-- What only a job's next placement needs (a retry, the queue), read when first asked for: a result
-- or a start never does.
local LATER = { max_attempts = true, job_timeout = true, pending_timeout = true, queue_max = true, tried = true }
local LATER_READ = { __index = function(j, key)
  if not LATER[key] then return nil end
  setmetatable(j, nil)
  local a, t, p, q = string.match(j.spec, SPEC_LATER)
  j.max_attempts, j.job_timeout = tonumber(a) or 1, tonumber(t) or 60000
  j.pending_timeout, j.queue_max = tonumber(p) or 10000, tonumber(q) or 0
  -- (a job's first holder is not written down as tried: its node says it; see assign_job)
  j.tried = rcall('HGET', j.key, 'tried') or j.node
  return j[key]
end }

-- A job written before its fields were packed (by an earlier version, during a rolling upgrade)
-- is packed on its first read.
local function pack_spec(key)
  local f = rcall('HMGET', key, 'pool', 'session', 'utt', 'tgt', 'max_attempts', 'job_timeout', 'pending_timeout',
    'queue_max', 'created')
  for i = 1, 9 do if not f[i] or f[i] == '' then f[i] = '0' end end
  local spec = make_spec(unpack(f))
  rcall('HSET', key, 'spec', spec)
  return spec
end

local function job_fields(ctx, jid)
  local key = k_job(ctx.base, jid)
  local f = rcall('HMGET', key, 'state', 'node', 'attempt', 'spec', 'sproc', 'listeners')
  if not f[1] then return nil end
  if not f[4] then f[4] = pack_spec(key) end
  local pool, session, utt, tgt = string.match(f[4], SPEC_HEAD)
  return setmetatable({
    key = key, spec = f[4], state = f[1], node = f[2] or '', attempt = tonumber(f[3]) or 0, pool = pool,
    session = session, utt = utt or '0', tgt = tgt or '', sproc = f[5] or '', listeners = f[6] or '',
  }, LATER_READ)
end

-- A room job's outcome goes to its listeners ("sid@proc" each), not to the speaking session.
local function each_listener(listeners, fn)
  for _, entry in ipairs(split_words(listeners)) do
    local sid, proc = string.match(entry, '^([^@]+)@(.*)$')
    if sid then fn(sid, proc) end
  end
end

local ROOM_JOB_KEEP_MS = 600000  -- an ended room job waits this long at most for its listeners' acks

local NONE = {}

local function finish_job(ctx, jid, j, state, code, payload, own, extra)
  if not payload or payload == '' then payload = nil end
  if payload then
    rcall('HSET', j.key, 'state', state, 'code', code or '', 'data', '', 'result', payload,
      unpack(extra or NONE))
  else
    rcall('HSET', j.key, 'state', state, 'code', code or '', 'data', '', unpack(extra or NONE))
  end
  if j.state == 'queued' then rcall('ZREM', k_pending(ctx.base), jid) end
  if state == 'failed' then
    count(ctx, 'jobs_failed')
    count(ctx, 'failed_' .. code)
    log_event(ctx, 'job_failed', { job = jid, code = code, session = j.session, utt = j.utt, tgt = j.tgt })
  end
  if j.listeners ~= '' then
    each_listener(j.listeners, function(sid, proc)
      emit(ctx, proc, { kind = 'outcome', job = jid, session = sid, speaker = j.session, utt = j.utt, tgt = j.tgt,
        state = state, code = code or '', node = j.node, attempt = int_s(j.attempt) }, payload)
    end)
    rcall('PEXPIRE', j.key, ROOM_JOB_KEEP_MS)
  else
    emit(ctx, j.sproc, {
      kind = 'outcome', job = jid, session = j.session, utt = j.utt, tgt = j.tgt,
      state = state, code = code or '', node = j.node, attempt = int_s(j.attempt),
    }, payload, own and payload ~= nil)
  end
  j.state = state
end

-- Can an effect for this process be delivered now? (the caller itself always can)
local function reachable(ctx, proc)
  if proc == ctx.proc then return true end
  if proc == '' or not proc_alive(ctx, proc) then return false end
  return rcall('XLEN', k_inbox(ctx.base, proc)) < INBOX_MAX_LEN
end

-- Give the job to node n. False, and nothing changed, when n's process cannot hear of it now (it
-- is gone, or its inbox is full: a stalled reader): the caller tries another node or the job waits.
local function assign_job(ctx, jid, j, n, extra, known_reachable)
  if not known_reachable and not reachable(ctx, n.proc) then
    count(ctx, 'unreachable')
    return false
  end
  local attempt = j.attempt + 1
  local lease = ctx.now + j.job_timeout
  take_slot(ctx, n, jid, j.pool, lease)
  local tried = j.tried
  if tried == '' then
    tried = n.id
  elseif not word_set(tried)[n.id] then
    tried = tried .. ' ' .. n.id
  end
  -- (when it was assigned: its lease less its job_timeout; the nodes it has tried: its node, until
  -- there is more than one)
  if tried == n.id then
    rcall('HSET', j.key, 'state', 'assigned', 'node', n.id, 'attempt', attempt, 'lease', lease, unpack(extra or NONE))
  else
    rcall('HSET', j.key, 'state', 'assigned', 'node', n.id, 'attempt', attempt, 'lease', lease, 'tried', tried,
      unpack(extra or NONE))
  end
  if attempt > 1 then
    count(ctx, 'reassigned')
    log_event(ctx, 'job_reassigned', { job = jid, node = n.id, attempt = attempt, from = j.node })
  end
  local own = jid == ctx.own_job
  local payload = nil
  if own then
    if n.proc ~= ctx.proc then payload = ctx.own_payload end
  elseif n.proc ~= '' then
    payload = rcall('HGET', j.key, 'data')
  end
  emit(ctx, n.proc, {
    kind = 'assign', job = jid, node = n.id, attempt = int_s(attempt), session = j.session, utt = j.utt,
    tgt = j.tgt, lease = lease,
  }, payload, own)
  j.state, j.node, j.attempt, j.tried = 'assigned', n.id, attempt, tried
  return true
end

-- A job waits in pool ``pid``: each node of the pool that still claims a free slot there (one the
-- placement could not use: its process cannot hear of it now, the job was just taken from it, or
-- it lay past the scan) is marked "waits", so that the next slot it gives back looks at the queues
-- (see fill_after_release). A node with no free slot needs no mark: the next slot it gives back is
-- looked at anyway. (Heartbeats look at the queues whatever the marks say: a mark lost past
-- WAITS_MARK_MAX delays a job by a heartbeat at most.)
local WAITS_MARK_MAX = 64
local function mark_waiting(ctx, pid)
  local free = rcall('ZRANGE', k_pool(ctx.base, pid), '+inf', 1, 'BYSCORE', 'REV', 'LIMIT', 0, WAITS_MARK_MAX)
  for _, nid in ipairs(free) do rcall('HSET', k_node(ctx.base, nid), 'waits', '1') end
end

local function enqueue_job(ctx, jid, j, extra)
  local qk = k_queue(ctx.base, j.pool)
  if rcall('LLEN', qk) >= j.queue_max then return false end
  rcall('RPUSH', qk, jid)
  rcall('ZADD', k_pending(ctx.base), ctx.now + j.pending_timeout, jid)
  rcall('HSET', j.key, 'state', 'queued', 'node', '', 'queued_at', ctx.now, 'tried', j.tried, unpack(extra or NONE))
  mark_waiting(ctx, j.pool)
  count(ctx, 'queued')
  j.state, j.node = 'queued', ''
  return true
end

-- The job needs a (new) holder: its slot on the old one is already given back. Next attempt on
-- another node, or wait in the queue, or fail. A node whose process cannot hear of it now is
-- skipped (no attempt spent): the job never waits on a holder that will not hear of it.
local function reassign_or_fail(ctx, jid, j, exclude, fail_code)
  exclude = exclude or {}
  if j.attempt >= j.max_attempts then
    finish_job(ctx, jid, j, 'failed', fail_code or 'JOB_TIMEOUT')
    return 'failed'
  end
  for _ = 1, 8 do
    local n = pick_node(ctx, j.pool, nil, word_set(j.tried), exclude)
    if not n then break end
    if assign_job(ctx, jid, j, n) then return 'reassigned' end
    exclude[n.id] = true
  end
  if enqueue_job(ctx, jid, j) then return 'queued' end
  finish_job(ctx, jid, j, 'failed', 'NODE_OVERLOADED')
  return 'failed'
end

-- The oldest job still waiting in a pool's queue; entries no longer waiting (cancelled, failed) are
-- dropped, 64 at most: then nil, nil, true (more may wait behind them).
local function queue_head(ctx, pid)
  local qk = k_queue(ctx.base, pid)
  for _ = 1, 64 do
    local jid = rcall('LINDEX', qk, 0)
    if not jid then return nil, nil end
    local deadline = tonumber(rcall('ZSCORE', k_pending(ctx.base), jid))
    if deadline then return jid, deadline end
    rcall('LPOP', qk)
  end
  return nil, nil, true
end

-- The node no longer needs to look at the queues: none of its pools has a job waiting.
local function unmark_waiting(ctx, n)
  if n and n.waits then
    rcall('HDEL', k_node(ctx.base, n.id), 'waits')
    n.waits = false
  end
end

-- Hand a node's free slots to the oldest jobs waiting in its pools' queues. ``n``: the node's
-- fields as this call left them, when the caller has them (they are kept up to date).
local function fill_from_queues(ctx, nid, n)
  if rcall('ZCARD', k_pending(ctx.base)) == 0 then return unmark_waiting(ctx, n) end
  n = n or node_fields(ctx, nid)
  if not node_is_live(ctx, n) or not reachable(ctx, n.proc) then return end
  for _ = 1, 64 do
    if n.max - n.used < 1 then return end
    local best_jid, best_pid, best_deadline, more = nil, nil, nil, false
    for _, pid in ipairs(split_words(n.pools)) do
      local jid, deadline, unread = queue_head(ctx, pid)
      if jid and (not best_deadline or deadline < best_deadline) then
        best_jid, best_pid, best_deadline = jid, pid, deadline
      end
      more = more or unread
    end
    if not best_jid then
      if more then break end  -- (the mark stays, or is made, below: the next slot looks further)
      return unmark_waiting(ctx, n)
    end
    rcall('LPOP', k_queue(ctx.base, best_pid))
    rcall('ZREM', k_pending(ctx.base), best_jid)
    local j = job_fields(ctx, best_jid)
    if j and j.state == 'queued' then
      if best_deadline < ctx.now then
        finish_job(ctx, best_jid, j, 'failed', 'JOB_TIMEOUT')
      else
        assign_job(ctx, best_jid, j, n)
      end
    end
  end
  -- (64 handed out, or stale entries left unread, and a free slot left: the next slot given back
  -- looks again)
  if n.max - n.used >= 1 and not n.waits then
    rcall('HSET', k_node(ctx.base, nid), 'waits', '1')
    n.waits = true
  end
end

-- A slot came back to node ``n`` (as release_slot left it, nil when it gave nothing back). While a
-- job waits in a pool, every node of the pool either has no free slot or is marked "waits" (see
-- mark_waiting): so the queues need a look only when the node was full or is marked, and the
-- common result costs no read of them at all.
local function fill_after_release(ctx, nid, n)
  if not n or n.was_full or n.waits then fill_from_queues(ctx, nid, n) end
end

-- A node is gone (socket closed, heartbeat deadline passed, its scheduler process died): nothing
-- new for it, and its jobs move on.
local function node_down(ctx, nid, reason)
  local n = node_fields(ctx, nid)
  if not n or n.state == 'offline' then return -1 end
  local nk = k_node(ctx.base, nid)
  rcall('HSET', nk, 'state', 'offline', 'offline_at', ctx.now, 'offline_reason', reason)
  rcall('ZREM', k_nodes(ctx.base), nid)
  rcall('ZADD', k_offline(ctx.base), ctx.now, nid)
  unpool(ctx, nid, n.pools)
  count_pools(ctx, n.pools, -1)
  if n.proc ~= '' then rcall('SREM', k_proc_nodes(ctx.base, n.proc), nid) end
  count(ctx, 'nodes_lost')
  log_event(ctx, 'node_offline', { node = nid, reason = reason })
  local jobs = split_words(n.jobs)
  for _, jid in ipairs(jobs) do
    release_slot(ctx, nid, jid)
    local j = job_fields(ctx, jid)
    if held_by(j, nid) then
      -- a node declared gone that is in fact alive (a stall) stops the work that moved on
      emit(ctx, n.proc, { kind = 'cancel', job = jid, node = nid, attempt = j.attempt, reason = reason })
      reassign_or_fail(ctx, jid, j, { [nid] = true })
    end
  end
  if n.lease_at then
    rcall('HDEL', nk, 'lease_at')
    rcall('ZREM', k_leases(ctx.base), nid)
  end
  rcall('PEXPIRE', nk, 3600000)
  return #jobs
end
