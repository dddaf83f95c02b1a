--[[
  Register or renew a scheduler process in a cell. A process whose registration lapses is dead
  to the cell: the reaper deletes its inbox stream.

  Input:
    KEYS[1] cell node registry "<base>nodes"
    ARGV[1] process id
    ARGV[2] ttl ms
  Output: JSON {status:"ok", deadline, effects, now}
]]
--- @include "includes/keys"
--- @include "includes/context"

local base = base_of(KEYS[1])
local ctx = new_context(base, ARGV[1])
local deadline = ctx.now + (tonumber(ARGV[2]) or 15000)
rcall('ZADD', k_procs(base), deadline, ARGV[1])
return reply(ctx, { status = 'ok', deadline = deadline })
