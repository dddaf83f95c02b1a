--[[
  Node selection for one pool. Order of preference:
    1. the session's previous node in this pool (it keeps per-session context) while it has a free slot;
    2. the node with the most free slots (spreads load), skipping nodes in the soft "avoid" set
       (a job's earlier holders; nodes already running another target of the same utterance);
    3. an avoided node, if nothing else is free.
  A member found dead or not ready is dropped from the pool on the way (it rejoins on heartbeat),
  so no dispatch scans it twice. At most SCAN_LIMIT members are read per call.
]]
local SCAN_LIMIT = 16

local function candidate_ok(ctx, nid)
  local n = node_fields(ctx, nid)
  if node_is_live(ctx, n) and free_slots(n) >= 1 then return true end
  return false
end

local function pick_node(ctx, pool_key, affinity_nid, avoid)
  if affinity_nid and not avoid[affinity_nid] then
    local score = rcall('ZSCORE', pool_key, affinity_nid)
    if score and tonumber(score) >= 1 and candidate_ok(ctx, affinity_nid) then
      return affinity_nid
    end
  end
  local fallback = nil
  local cands = rcall('ZRANGE', pool_key, '+inf', 1, 'BYSCORE', 'REV', 'LIMIT', 0, SCAN_LIMIT)
  for _, nid in ipairs(cands) do
    local n = node_fields(ctx, nid)
    if not node_is_live(ctx, n) then
      rcall('ZREM', pool_key, nid)
    elseif free_slots(n) >= 1 then
      if not avoid[nid] then return nid end
      fallback = fallback or nid
    end
  end
  return fallback
end
