--[[
  Register or renew a scheduler process in a cell. A process whose registration lapses is dead
  to the cell: the reaper takes its nodes offline, orphans its sessions and deletes its inbox.

  Also marks the cell's data generation: "boot" is set once (token:time) and lives as long as the
  data does. A process that sees it change knows Redis lost its data (a restart without
  persistence, a failover that lost writes) and re-registers the nodes and sessions it holds.

  Input:
    KEYS[1] cell node registry "<base>nodes"
    ARGV[1] process id
    ARGV[2] ttl ms
    ARGV[3] a fresh token, used when the cell has no boot marker yet
  Output: [body, effects], body {status:"ok", deadline, boot, revived, now}
    revived: the process was not registered (new, or declared dead while Redis stalled it: it then
    registers its nodes and sessions again)
]]
--- @include "includes/keys"
--- @include "includes/context"

local base = base_of(KEYS[1])
local ttl = need_number(ARGV[2], 'ttl_ms', 1)
local ctx = new_context(base, ARGV[1])
local deadline = ctx.now + ttl
local revived = rcall('ZADD', k_procs(base), deadline, ARGV[1]) == 1
rcall('SET', k_boot(base), ARGV[3] .. ':' .. ctx.now, 'NX')
return reply(ctx, { status = 'ok', deadline = deadline, boot = rcall('GET', k_boot(base)), revived = revived })
