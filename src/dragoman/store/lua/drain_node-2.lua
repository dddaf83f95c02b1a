--[[
  Drain a node (operator action, or the node's own `draining` flag): it takes no new job (I4) and
  keeps the ones it runs. Undrain puts it back in its pools, if it is alive.

  Input:
    KEYS[1] cell node registry "<base>nodes"
    KEYS[2] node hash          "<base>node:<node_id>"
    ARGV[1] calling process id
    ARGV[2] node_id
    ARGV[3] "1" drain, "0" undrain
    ARGV[4] source: "operator" | "node"
    ARGV[5] call id (a retry after a lost reply gets the same reply again)
  Output: [body, effects, payloads...], body {status:"ok"|"unknown", state, used, now}
]]
--- @include "includes/keys"
--- @include "includes/context"
--- @include "includes/nodes"
--- @include "includes/jobs"

local base = base_of(KEYS[1])
local nid = ARGV[2]
if KEYS[2] ~= k_node(base, nid) then error('ERR dragoman: node key does not match node_id') end
local ctx = new_context(base, ARGV[1])
local again = replay(ctx, ARGV[5])
if again then return again end
local n = node_fields(ctx, nid)
if not n or n.state == 'offline' then return reply(ctx, { status = 'unknown' }) end
if ARGV[3] == '1' then
  if n.state ~= 'draining' then
    rcall('HSET', KEYS[2], 'state', 'draining', 'drain_source', ARGV[4])
    log_event(ctx, 'node_draining', { node = nid, source = ARGV[4] })
    n.state = 'draining'
  end
  unpool(ctx, nid, n.pools)
elseif n.state == 'draining' then
  rcall('HSET', KEYS[2], 'state', 'ready', 'drain_source', '')
  n.state = 'ready'
  score_pools(ctx, n)
  fill_from_queues(ctx, nid, n)
end
return reply(ctx, { status = 'ok', state = n.state, used = n.used })
