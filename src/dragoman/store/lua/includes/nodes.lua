--[[
  Nodes, slots and selection.

  Slot accounting (I1): a node's slots in use are its job set "node:<id>:jobs" (used = SCARD); a
  slot is taken by SADD and given back by SREM, so giving back twice can never free a slot twice.

  Pools are sorted sets of ready nodes keyed by free slots (max - used). Selection reads the top of
  the set, so its cost grows with log(pool size), never with a scan. A slot taken or given back moves
  the node's score by one in each of its pools (ZADD XX INCR: a node dropped from a pool is not put
  back by that); registration, heartbeats and undrain set the exact score.

  The cell's "pools" hash counts the registered (not offline) nodes of each pool: the operators'
  list of pools, which shrinks when no node serves a pool any more.
]]

local function node_fields(ctx, nid)
  local f = rcall('HMGET', k_node(ctx.base, nid), 'state', 'max', 'deadline', 'pools', 'proc', 'max_target')
  if not f[1] then return nil end
  return {
    id = nid, state = f[1], max = tonumber(f[2]) or 0, deadline = tonumber(f[3]) or 0,
    pools = f[4] or '', proc = f[5] or '', max_target = tonumber(f[6]),
  }
end

local function node_used(ctx, nid)
  return rcall('SCARD', k_node_jobs(ctx.base, nid))
end

local function node_is_live(ctx, n)
  return n ~= nil and n.state == 'ready' and n.deadline >= ctx.now
end

local function score_pools(ctx, n)
  local free = n.max - node_used(ctx, n.id)
  if free < 0 then free = 0 end
  for _, pid in ipairs(split_words(n.pools)) do
    rcall('ZADD', k_pool(ctx.base, pid), free, n.id)
  end
end

local function shift_pools(ctx, n, delta)
  if n.state ~= 'ready' then return end
  for _, pid in ipairs(split_words(n.pools)) do
    rcall('ZADD', k_pool(ctx.base, pid), 'XX', 'INCR', delta, n.id)
  end
end

local function unpool(ctx, nid, pools)
  for _, pid in ipairs(split_words(pools)) do
    rcall('ZREM', k_pool(ctx.base, pid), nid)
  end
end

-- The last node of a pool leaving is remembered ("pools_gone"): right after a scheduler process or
-- Redis failed, its nodes are on their way back, and a job for the pool waits rather than fails.
local function count_pools(ctx, pools, delta)
  local key = k_pools(ctx.base)
  for _, pid in ipairs(split_words(pools)) do
    local n = rcall('HINCRBY', key, pid, delta)
    if n <= 0 then
      rcall('HDEL', key, pid)
      rcall('HSET', k_pools_gone(ctx.base), pid, ctx.now)
    elseif n == delta then
      rcall('HDEL', k_pools_gone(ctx.base), pid)
    end
  end
end

local function take_slot(ctx, n, jid)
  if rcall('SADD', k_node_jobs(ctx.base, n.id), jid) == 1 then shift_pools(ctx, n, -1) end
end

-- Returns the node's fields (nil when the job was not in its set: nothing changed).
local function release_slot(ctx, nid, jid)
  if not nid or nid == '' then return nil end
  if rcall('SREM', k_node_jobs(ctx.base, nid), jid) == 0 then return nil end
  local n = node_fields(ctx, nid)
  if not n then return nil end
  if n.max_target and n.max > n.max_target then
    -- capacity lowered while the node held more jobs: shrink with each slot given back (I1 holds)
    n.max = math.max(n.max_target, node_used(ctx, nid))
    rcall('HSET', k_node(ctx.base, nid), 'max', n.max)
    if n.max == n.max_target then rcall('HDEL', k_node(ctx.base, nid), 'max_target') end
    if n.state == 'ready' then score_pools(ctx, n) end
  else
    shift_pools(ctx, n, 1)
  end
  return n
end

--[[
  Node selection for one pool. Order of preference:
    1. the session's previous node in this pool (it keeps per-session context) while it has a free slot;
    2. the node with the most free slots (spreads load), skipping nodes in the soft "avoid" set
       (a job's earlier holders; nodes already running another target of the same utterance);
    3. an avoided node, if nothing else is free.
  Nodes in "exclude" are never chosen. A member found dead or not ready is dropped from the pool on
  the way (it rejoins on heartbeat), so no dispatch reads it twice. At most SCAN_LIMIT are read.
]]
local SCAN_LIMIT = 16

local function pick_node(ctx, pool_key, affinity_nid, avoid, exclude)
  exclude = exclude or {}
  if affinity_nid and not avoid[affinity_nid] and not exclude[affinity_nid] then
    local score = rcall('ZSCORE', pool_key, affinity_nid)
    if score and tonumber(score) >= 1 then
      local n = node_fields(ctx, affinity_nid)
      if node_is_live(ctx, n) then return n end
    end
  end
  local fallback = nil
  local cands = rcall('ZRANGE', pool_key, '+inf', 1, 'BYSCORE', 'REV', 'LIMIT', 0, SCAN_LIMIT)
  for _, nid in ipairs(cands) do
    if not exclude[nid] then
      local n = node_fields(ctx, nid)
      if not node_is_live(ctx, n) then
        rcall('ZREM', pool_key, nid)
      elseif not avoid[nid] then
        return n
      else
        fallback = fallback or n
      end
    end
  end
  return fallback
end
