--[[
  Slot accounting (I1). A node's "used" counter moves only together with membership of its job
  set "node:<id>:jobs": SADD succeeds -> used+1, SREM succeeds -> used-1. A release that finds the
  job already gone changes nothing, so releasing twice can never give a slot back twice.

  Pools are sorted sets keyed by free slots (max - used). Only ready nodes are members; selection
  reads the top of the set, so its cost grows with log(pool size), never with a scan.
]]

local function node_fields(ctx, nid)
  local f = rcall('HMGET', k_node(ctx.base, nid), 'state', 'max', 'used', 'deadline', 'pools', 'proc',
    'max_target')
  if not f[1] then return nil end
  return {
    state = f[1], max = tonumber(f[2]) or 0, used = tonumber(f[3]) or 0,
    deadline = tonumber(f[4]) or 0, pools = f[5] or '', proc = f[6] or '', max_target = tonumber(f[7]),
  }
end

local function node_is_live(ctx, n)
  return n ~= nil and n.state == 'ready' and n.deadline >= ctx.now
end

local function free_slots(n)
  local free = n.max - n.used
  if free < 0 then return 0 end
  return free
end

-- Put a ready node in each of its pools with its current free capacity.
local function score_pools(ctx, nid, n)
  local free = free_slots(n)
  for _, pid in ipairs(split_words(n.pools)) do
    rcall('ZADD', k_pool(ctx.base, pid), free, nid)
  end
end

local function unpool(ctx, nid, pools)
  for _, pid in ipairs(split_words(pools)) do
    rcall('ZREM', k_pool(ctx.base, pid), nid)
  end
end

-- Both return the node's fields after the change (nil when nothing changed).
local function take_slot(ctx, nid, jid)
  if rcall('SADD', k_node_jobs(ctx.base, nid), jid) == 0 then return nil end
  rcall('HINCRBY', k_node(ctx.base, nid), 'used', 1)
  local n = node_fields(ctx, nid)
  if n.state == 'ready' then score_pools(ctx, nid, n) end
  return n
end

local function release_slot(ctx, nid, jid)
  if not nid or nid == '' then return nil end
  if rcall('SREM', k_node_jobs(ctx.base, nid), jid) == 0 then return nil end
  local nk = k_node(ctx.base, nid)
  rcall('HINCRBY', nk, 'used', -1)
  local n = node_fields(ctx, nid)
  if n and n.max_target and n.max > n.max_target then
    -- capacity lowered while the node held more jobs: shrink with each slot given back (I1 holds)
    n.max = math.max(n.max_target, n.used)
    rcall('HSET', nk, 'max', n.max)
    if n.max == n.max_target then rcall('HDEL', nk, 'max_target') end
  end
  if n and n.state == 'ready' then score_pools(ctx, nid, n) end
  return n
end
