--[[
  A node's socket closed: it gets no new job (I4) and every job it held is reassigned, queued or
  failed at once, without waiting for its heartbeat deadline. Fenced by connection id, so the close
  of an old socket cannot take down a node that has already reconnected elsewhere.

  Input:
    KEYS[1] cell node registry "<base>nodes"
    KEYS[2] node hash          "<base>node:<node_id>"
    ARGV[1] calling process id
    ARGV[2] node_id
    ARGV[3] connection id ("" = whatever the current connection is: operator action)
    ARGV[4] reason (e.g. "socket_closed")
    ARGV[5] call id (a retry after a lost reply gets the same reply again)
  Output: [body, effects, payloads...], body {status:"offline"|"unknown"|"superseded", jobs, now}
]]
--- @include "includes/keys"
--- @include "includes/context"
--- @include "includes/nodes"
--- @include "includes/jobs"

local base = base_of(KEYS[1])
local nid, conn = ARGV[2], ARGV[3]
if KEYS[2] ~= k_node(base, nid) then error('ERR dragoman: node key does not match node_id') end
local ctx = new_context(base, ARGV[1])
local again = replay(ctx, ARGV[5])
if again then return again end
local current = rcall('HGET', KEYS[2], 'conn')
if not current then return reply(ctx, { status = 'unknown', jobs = 0 }) end
if conn ~= '' and current ~= conn then return reply(ctx, { status = 'superseded', jobs = 0 }) end
local moved = node_down(ctx, nid, ARGV[4])
if moved < 0 then return reply(ctx, { status = 'unknown', jobs = 0 }) end
return reply(ctx, { status = 'offline', jobs = moved })
