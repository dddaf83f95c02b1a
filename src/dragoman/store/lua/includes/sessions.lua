--[[
  Sessions in a cell. A session's record "sess:<id>" holds the process holding its socket (proc),
  its epoch (raised by every resume: only the current holder may dispatch or close it, I11), its
  previous node per pool ("a:<pool>", affinity), and one field "j:<job id>" per job whose outcome it
  has not yet acknowledged. The home cell's record also holds the session's settings and resume
  point (spec; "resume": "next_utt seq skip cutt", one field).

  A session whose socket or process is lost becomes an orphan for a grace period: its jobs go on and
  their outcomes wait with the jobs, for a client that resumes. Past the grace it is abandoned:
  waiting jobs leave their queues, running ones get job_cancel, and it is forgotten.
]]

-- Cancel what a gone session was owed and forget it. Nobody hears of outcomes: nobody is listening.
local function session_abandon(ctx, sid, reason)
  local sk = k_sess(ctx.base, sid)
  local fields = rcall('HGETALL', sk)
  if #fields == 0 then
    rcall('ZREM', k_orphans(ctx.base), sid)
    return -1
  end
  local proc, cancelled, freed = '', 0, {}
  for i = 1, #fields, 2 do
    local f = fields[i]
    if f == 'proc' then
      proc = fields[i + 1]
    elseif string.sub(f, 1, 2) == 'j:' then
      local jid = string.sub(f, 3)
      local j = job_fields(ctx, jid)
      if j and not TERMINAL[j.state] then
        cancelled = cancelled + 1
        if j.state == 'queued' then
          rcall('LREM', k_queue(ctx.base, j.pool), 1, jid)
          rcall('ZREM', k_pending(ctx.base), jid)
        elseif j.node ~= '' then
          local holder = node_fields(ctx, j.node)
          emit(ctx, holder and holder.proc or '', { kind = 'cancel', job = jid, node = j.node,
            attempt = j.attempt, reason = reason })
          release_slot(ctx, j.node, jid, j.pool)
          freed[j.node] = true
        end
      end
      rcall('DEL', k_job(ctx.base, jid))
    end
  end
  rcall('DEL', sk)
  rcall('ZREM', k_orphans(ctx.base), sid)
  if proc ~= '' then rcall('SREM', k_proc_sessions(ctx.base, proc), sid) end
  if cancelled > 0 then count(ctx, 'jobs_abandoned', cancelled) end
  for nid in pairs(freed) do fill_from_queues(ctx, nid) end
  return cancelled
end

-- The session's socket or process is gone: keep it for a client that resumes, until the grace ends.
local function session_orphan(ctx, sid, grace_ms)
  local sk = k_sess(ctx.base, sid)
  local proc = rcall('HGET', sk, 'proc')
  if not proc then return -1 end
  if grace_ms <= 0 then return session_abandon(ctx, sid, 'session_gone') end
  rcall('HSET', sk, 'proc', '', 'state', 'orphan', 'orphan_at', ctx.now)
  rcall('ZADD', k_orphans(ctx.base), ctx.now + grace_ms, sid)
  if proc ~= '' then rcall('SREM', k_proc_sessions(ctx.base, proc), sid) end
  return 0
end
