--[[
  Job transitions shared by the scripts. States (see dragoman/core/states.py):
    queued -> assigned -> running -> completed | completed_empty | failed
    assigned/running -> queued | assigned (reassignment, attempt + 1) | failed
  finish_job is the only way into a terminal state and emits the job's single outcome (I3).
]]
local TERMINAL = { completed = true, completed_empty = true, failed = true }

local function job_fields(ctx, jid)
  local f = rcall('HMGET', k_job(ctx.base, jid), 'state', 'node', 'attempt', 'pool', 'session', 'utt',
    'tgt', 'sproc', 'max_attempts', 'job_timeout', 'pending_timeout', 'queue_max', 'tried', 'ttl')
  if not f[1] then return nil end
  return {
    state = f[1], node = f[2] or '', attempt = tonumber(f[3]) or 0, pool = f[4], session = f[5],
    utt = tonumber(f[6]) or 0, tgt = f[7] or '', sproc = f[8] or '', max_attempts = tonumber(f[9]) or 1,
    job_timeout = tonumber(f[10]), pending_timeout = tonumber(f[11]), queue_max = tonumber(f[12]) or 0,
    tried = f[13] or '', ttl = tonumber(f[14]) or 3600000,
  }
end

local function finish_job(ctx, jid, j, state, code, payload)
  local jk = k_job(ctx.base, jid)
  rcall('HSET', jk, 'state', state, 'code', code or '', 'finished', ctx.now)
  if j.state == 'queued' then
    rcall('ZREM', k_pending(ctx.base), jid)
  elseif j.state ~= 'new' then
    rcall('ZREM', k_leases(ctx.base), jid)
  end
  rcall('DEL', k_jobdata(ctx.base, jid))
  rcall('PEXPIRE', jk, j.ttl)
  rcall('HINCRBY', k_stats(ctx.base), 'jobs_' .. state, 1)
  if state == 'failed' then
    rcall('HINCRBY', k_stats(ctx.base), 'failed_' .. code, 1)
    log_event(ctx, 'job_failed', { job = jid, code = code, session = j.session, utt = j.utt, tgt = j.tgt })
  end
  emit(ctx, j.sproc, {
    kind = 'outcome', job = jid, session = j.session, utt = j.utt, tgt = j.tgt,
    state = state, code = code or '', node = j.node, attempt = j.attempt,
  }, payload)
  j.state = state
end

local function assign_job(ctx, jid, j, nid)
  local n = take_slot(ctx, nid, jid) or node_fields(ctx, nid)
  local attempt = j.attempt + 1
  local lease = ctx.now + j.job_timeout
  local tried = j.tried
  if not word_set(tried)[nid] then tried = (tried == '' and nid) or (tried .. ' ' .. nid) end
  rcall('HSET', k_job(ctx.base, jid), 'state', 'assigned', 'node', nid, 'attempt', attempt,
    'assigned_at', ctx.now, 'lease', lease, 'tried', tried)
  rcall('ZADD', k_leases(ctx.base), lease, jid)
  if j.state == 'queued' then rcall('ZREM', k_pending(ctx.base), jid) end
  local ak = k_affinity(ctx.base, j.session)
  rcall('HSET', ak, j.pool, nid)
  rcall('PEXPIRE', ak, 3600000)
  rcall('HINCRBY', k_stats(ctx.base), 'assigned', 1)
  if attempt > 1 then
    rcall('HINCRBY', k_stats(ctx.base), 'reassigned', 1)
    log_event(ctx, 'job_reassigned', { job = jid, node = nid, attempt = attempt, from = j.node })
  end
  local proc = n.proc
  local payload = nil
  if proc ~= '' and proc ~= ctx.proc then payload = rcall('GET', k_jobdata(ctx.base, jid)) or nil end
  emit(ctx, proc, {
    kind = 'assign', job = jid, node = nid, attempt = attempt, session = j.session, utt = j.utt,
    tgt = j.tgt, lease = lease,
  }, payload)
  j.state, j.node, j.attempt, j.tried = 'assigned', nid, attempt, tried
end

local function enqueue_job(ctx, jid, j)
  local qk = k_queue(ctx.base, j.pool)
  if rcall('LLEN', qk) >= j.queue_max then return false end
  rcall('RPUSH', qk, jid)
  rcall('ZADD', k_pending(ctx.base), ctx.now + j.pending_timeout, jid)
  rcall('ZREM', k_leases(ctx.base), jid)
  rcall('HSET', k_job(ctx.base, jid), 'state', 'queued', 'node', '', 'queued_at', ctx.now)
  rcall('HINCRBY', k_stats(ctx.base), 'queued', 1)
  j.state, j.node = 'queued', ''
  return true
end

-- The holder lost the job (its slot is already released): next attempt elsewhere, wait, or fail.
local function reassign_or_fail(ctx, jid, j)
  if j.attempt >= j.max_attempts then
    finish_job(ctx, jid, j, 'failed', 'JOB_TIMEOUT')
    return 'failed'
  end
  local nid = pick_node(ctx, k_pool(ctx.base, j.pool), nil, word_set(j.tried))
  if nid then
    assign_job(ctx, jid, j, nid)
    return 'reassigned'
  end
  if enqueue_job(ctx, jid, j) then return 'queued' end
  finish_job(ctx, jid, j, 'failed', 'NODE_OVERLOADED')
  return 'failed'
end

-- The oldest job still waiting in a pool's queue; entries no longer waiting (cancelled, failed) are dropped.
local function queue_head(ctx, pid)
  local qk = k_queue(ctx.base, pid)
  for _ = 1, 64 do
    local jid = rcall('LINDEX', qk, 0)
    if not jid then return nil, nil end
    local deadline = tonumber(rcall('ZSCORE', k_pending(ctx.base), jid))
    if deadline then return jid, deadline end
    rcall('LPOP', qk)
  end
  return nil, nil
end

-- Hand a node's free slots to the oldest jobs waiting in its pools' queues.
local function fill_from_queues(ctx, nid)
  for _ = 1, 64 do
    local n = node_fields(ctx, nid)
    if not node_is_live(ctx, n) or free_slots(n) < 1 then return end
    local best_jid, best_pid, best_deadline = nil, nil, nil
    for _, pid in ipairs(split_words(n.pools)) do
      local jid, deadline = queue_head(ctx, pid)
      if jid and (not best_deadline or deadline < best_deadline) then
        best_jid, best_pid, best_deadline = jid, pid, deadline
      end
    end
    if not best_jid then return end
    rcall('LPOP', k_queue(ctx.base, best_pid))
    rcall('ZREM', k_pending(ctx.base), best_jid)
    local j = job_fields(ctx, best_jid)
    if j and j.state == 'queued' then
      if best_deadline < ctx.now then
        finish_job(ctx, best_jid, j, 'failed', 'JOB_TIMEOUT')
      else
        assign_job(ctx, best_jid, j, nid)
      end
    end
  end
end

-- A node is gone (socket closed, heartbeat deadline passed): nothing new for it, its jobs move on.
local function node_down(ctx, nid, reason)
  local n = node_fields(ctx, nid)
  if not n or n.state == 'offline' then return -1 end
  local nk = k_node(ctx.base, nid)
  rcall('HSET', nk, 'state', 'offline', 'offline_at', ctx.now, 'offline_reason', reason)
  rcall('ZREM', k_nodes(ctx.base), nid)
  rcall('ZADD', k_offline(ctx.base), ctx.now, nid)
  unpool(ctx, nid, n.pools)
  rcall('HINCRBY', k_stats(ctx.base), 'nodes_lost', 1)
  log_event(ctx, 'node_offline', { node = nid, reason = reason })
  local jobs = rcall('SMEMBERS', k_node_jobs(ctx.base, nid))
  for _, jid in ipairs(jobs) do
    release_slot(ctx, nid, jid)
    local j = job_fields(ctx, jid)
    if j and not TERMINAL[j.state] and j.node == nid then reassign_or_fail(ctx, jid, j) end
  end
  rcall('PEXPIRE', nk, 3600000)
  return #jobs
end
