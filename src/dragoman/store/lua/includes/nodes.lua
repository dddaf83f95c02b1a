--[[
  Nodes, slots and selection.

  Slot accounting (I1): the jobs a node holds are its record's "jobs" field (job ids, space
  separated) and "used" how many, read with the rest of the node in one HMGET and written together
  in one HSET. A slot is taken by adding the job and given back by removing it; giving back a job the node
  does not hold changes nothing, so a slot is never freed twice.

  Lease index: the cell's "leases" scores each node that holds jobs with a time no later than the
  earliest lease among them (its record's "lease_at" is the same score). Taking a slot writes it
  only when the new lease is earlier; giving one back never does. So the index may wake the reaper
  early for a node (which then scores it exactly again: reindex_leases), never late, and a job
  costs no index write in the common case.

  Pools are sorted sets of ready nodes keyed by free slots (max - used). Selection reads the top of
  the set, so its cost grows with log(pool size), never with a scan. Registration, heartbeats and
  undrain set the exact score in every pool of the node (ZADD XX everywhere below: a node dropped
  from a pool is never put back by a slot moving).

  A slot taken or given back re-scores the node in the job's pool only, not in each of its pools: a
  node serving ten languages is in a hundred pools, and one job must not cost a hundred writes. Its
  other pools may then over-state its free slots (selection counts the real ones, and corrects a
  full node's score on the way), but never hide a free slot: the slot that fills the node scores
  every pool 0, and the first one given back scores every pool exactly again. So while a node has a
  free slot, its score is at least 1 in each of its pools. A node in one pool is always exact.

  "waits" on a node's record: a job waits in one of its pools although the node claimed a free slot
  there (see mark_waiting in jobs.lua); the next slot it gives back then looks at the queues, as the
  next one of a full node always does. Any other slot given back needs no look.

  The cell's "pools" hash counts the registered (not offline) nodes of each pool: the operators'
  list of pools, which shrinks when no node serves a pool any more.
]]

-- Where ``word`` is, whole, in the space-separated ``list`` (ids never hold a space), or nil.
-- (No copy of the list is made: a node may hold up to 1,024 jobs.)
local SPACE = 32  -- string.byte(' '); the string library is not a global at library load
local function word_at(list, word)
  local from = 1
  while true do
    local at = string.find(list, word, from, true)
    if not at then return nil end
    local after = at + #word
    if (at == 1 or string.byte(list, at - 1) == SPACE) and (after > #list or string.byte(list, after) == SPACE) then
      return at
    end
    from = at + 1
  end
end

-- ``list`` without ``word``, or nil when it is not there.
local function without_word(list, word)
  local at = word_at(list, word)
  if not at then return nil end
  if at == 1 then return string.sub(list, #word + 2) end
  return string.sub(list, 1, at - 2) .. string.sub(list, at + #word)
end

local function has_word(list, word)
  return word_at(list, word) ~= nil
end

-- A node's record as a table, from an HMGET that reads the fields choosing a node needs first, in
-- this order (see node_to_pick); ``max_target`` and ``waits`` only a slot given back needs.
local NO_MORE = {}
local function node_from(nid, f, max_target, waits, more)
  return {
    id = nid, state = f[1], max = tonumber(f[2]) or 0, deadline = tonumber(f[3]) or 0, pools = f[4] or '',
    proc = f[5] or '', jobs = f[6] or '', used = tonumber(f[7]) or 0, lease_at = tonumber(f[8]),
    max_target = max_target, waits = waits, more = more,
  }
end

-- The node's fields, plus ``more`` (a list of field names) read in the same HMGET into n.more.
local function node_fields(ctx, nid, more)
  more = more or NO_MORE
  local f = rcall('HMGET', k_node(ctx.base, nid), 'state', 'max', 'deadline', 'pools', 'proc', 'jobs', 'used',
    'lease_at', 'max_target', 'waits', unpack(more))
  if not f[1] then return nil end
  local extra = NO_MORE
  if #more > 0 then
    extra = {}
    for i, name in ipairs(more) do extra[name] = f[10 + i] end
  end
  return node_from(nid, f, tonumber(f[9]), f[10] and true or false, extra)
end

-- What choosing a node and taking a slot on it read: node_fields less what only a slot given back
-- needs (max_target, waits; most often absent, and an absent field costs the server a whole scan).
local function node_to_pick(ctx, nid)
  local f = rcall('HMGET', k_node(ctx.base, nid), 'state', 'max', 'deadline', 'pools', 'proc', 'jobs', 'used',
    'lease_at')
  if not f[1] then return nil end
  return node_from(nid, f, nil, false, NO_MORE)
end

local function node_is_live(ctx, n)
  return n ~= nil and n.state == 'ready' and n.deadline >= ctx.now
end

local function score_pools(ctx, n)
  local free = n.max - n.used
  if free < 0 then free = 0 end
  for _, pid in ipairs(split_words(n.pools)) do
    rcall('ZADD', k_pool(ctx.base, pid), free, n.id)
  end
end

local function in_one_pool(n)
  return not string.find(n.pools, ' ', 1, true)
end

local function rescore(ctx, n, pid, free)
  if free < 0 then free = 0 end
  rcall('ZADD', k_pool(ctx.base, pid), 'XX', free, n.id)
end

-- After a slot moved (delta -1 taken, +1 given back) for a job of pool ``pid`` (nil: unknown).
local function slot_moved(ctx, n, pid, delta)
  if n.state ~= 'ready' then return end
  if in_one_pool(n) then
    rcall('ZADD', k_pool(ctx.base, n.pools), 'XX', 'INCR', delta, n.id)
    return
  end
  local free = n.max - n.used
  if pid and free > 0 and not (delta > 0 and free == 1) then
    rescore(ctx, n, pid, free)
  else  -- the node just filled up, or just left full: every pool learns it
    for _, p in ipairs(split_words(n.pools)) do rescore(ctx, n, p, free) end
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

-- The job's slot on node n (read in this call), with its lease: one HSET, and an index write only
-- when this lease is the node's earliest.
local function take_slot(ctx, n, jid, pid, lease)
  if has_word(n.jobs, jid) then return end
  n.jobs = (n.jobs == '') and jid or (n.jobs .. ' ' .. jid)
  n.used = n.used + 1
  if n.lease_at and n.lease_at <= lease then
    rcall('HSET', k_node(ctx.base, n.id), 'jobs', n.jobs, 'used', n.used)
  else
    n.lease_at = lease
    rcall('HSET', k_node(ctx.base, n.id), 'jobs', n.jobs, 'used', n.used, 'lease_at', lease)
    rcall('ZADD', k_leases(ctx.base), lease, n.id)
  end
  slot_moved(ctx, n, pid, -1)
end

-- Returns the node's fields (nil when it does not hold the job: nothing changed); n.was_full says
-- whether the node had no free slot before this one came back.
local function release_slot(ctx, nid, jid, pid)
  if not nid or nid == '' then return nil end
  local n = node_fields(ctx, nid)
  if not n then return nil end
  local rest = without_word(n.jobs, jid)
  if not rest then return nil end
  n.was_full = n.used >= n.max
  n.jobs, n.used = rest, n.used - 1
  local nk = k_node(ctx.base, nid)
  if n.max_target and n.max > n.max_target then
    -- capacity lowered while the node held more jobs: shrink with each slot given back (I1 holds)
    n.max = math.max(n.max_target, n.used)
    rcall('HSET', nk, 'jobs', rest, 'used', n.used, 'max', n.max)
    if n.max == n.max_target then rcall('HDEL', nk, 'max_target') end
    if n.state == 'ready' then score_pools(ctx, n) end
  else
    rcall('HSET', nk, 'jobs', rest, 'used', n.used)
    slot_moved(ctx, n, pid, 1)
  end
  return n
end

-- Score node n in the lease index exactly: the earliest lease of the jobs it holds (none: out).
-- The reaper does this for a node whose score came due; registration for the jobs a node brings.
local function reindex_leases(ctx, n)
  local first = nil
  for _, jid in ipairs(split_words(n.jobs)) do
    local lease = tonumber(rcall('HGET', k_job(ctx.base, jid), 'lease'))
    if lease and (not first or lease < first) then first = lease end
  end
  if first == n.lease_at then return end
  if first then
    rcall('HSET', k_node(ctx.base, n.id), 'lease_at', first)
    rcall('ZADD', k_leases(ctx.base), first, n.id)
  else
    rcall('HDEL', k_node(ctx.base, n.id), 'lease_at')
    rcall('ZREM', k_leases(ctx.base), n.id)
  end
  n.lease_at = first
end

--[[
  Node selection for one pool. Order of preference:
    1. the session's previous node in this pool (it keeps per-session context) while it has a free slot;
    2. the node with the most free slots (spreads load), skipping nodes in the soft "avoid" set
       (a job's earlier holders; nodes already running another target of the same utterance);
    3. an avoided node, if nothing else is free.
  Nodes in "exclude" are never chosen. A member found dead or not ready is dropped from the pool on
  the way (it rejoins on heartbeat), so no dispatch reads it twice. At most SCAN_LIMIT are read
  (excluded ones aside).
]]
local SCAN_LIMIT = 16
local SCAN_STEPS = { 4, SCAN_LIMIT - 4 }  -- (a second read starts after the first: see pick_node)

-- Has the node a free slot? Its score said so; a node in several pools may be full all the same
-- (its score here over-stated it), and is scored 0 here on the way.
local function has_free_slot(n, pool_key)
  if n.used < n.max then return true end
  rcall('ZADD', pool_key, 'XX', 0, n.id)
  return false
end

local NO_NODES = {}
local function pick_node(ctx, pid, affinity_nid, avoid, exclude)
  exclude = exclude or NO_NODES
  local pool_key = k_pool(ctx.base, pid)
  if affinity_nid and not avoid[affinity_nid] and not exclude[affinity_nid] then
    -- (ready, live and serving the pool: in the pool's set, which need not be read)
    local n = node_to_pick(ctx, affinity_nid)
    if node_is_live(ctx, n) and n.used < n.max and has_word(n.pools, pid) then return n end
  end
  -- The first few candidates nearly always do; only when none of them can are more read (those
  -- already read are not read again, short of an excluded one: each was dropped, scored 0 or chosen).
  local fallback = nil
  for _, limit in ipairs(SCAN_STEPS) do
    local cands = rcall('ZRANGE', pool_key, '+inf', 1, 'BYSCORE', 'REV', 'LIMIT', 0, limit)
    for _, nid in ipairs(cands) do
      if not exclude[nid] then
        local n = node_to_pick(ctx, nid)
        if not node_is_live(ctx, n) then
          rcall('ZREM', pool_key, nid)
        elseif not has_free_slot(n, pool_key) then  -- luacheck: ignore (skipped: full)
        elseif not avoid[nid] then
          return n
        else
          fallback = fallback or n
        end
      end
    end
    if fallback or #cands < limit then return fallback end
  end
  return fallback
end

-- Right after Redis lost its data, or the pool lost its last node, its nodes are on their way back:
-- for ``warmup`` ms a job for the pool waits rather than fails.
local function warming_up(ctx, pid, warmup)
  if warmup <= 0 then return false end
  local boot = rcall('GET', k_boot(ctx.base))
  if not boot then return true end
  local born = tonumber(string.match(boot, ':(%d+)$') or '')
  if born == nil or ctx.now - born < warmup then return true end
  local gone = tonumber(rcall('HGET', k_pools_gone(ctx.base), pid) or '')
  return gone ~= nil and ctx.now - gone < warmup
end
