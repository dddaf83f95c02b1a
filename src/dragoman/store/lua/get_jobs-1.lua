--[[
  Read-only: where these jobs stand, for a session that waited long for one (I10). A finished job
  comes with its kept result, so an outcome whose effect was lost is still delivered; a job Redis
  no longer knows is "missing" (its session dispatches it again or answers with an error).

  Input:
    KEYS[1] cell node registry "<base>nodes"
    ARGV[1..] job ids
  Output: [body, effects, payloads...], body {status:"ok", jobs:[{job, state, code, node, attempt, utt, tgt, p}], now}
]]
--- @include "includes/keys"
--- @include "includes/context"

local base = base_of(KEYS[1])
local ctx = new_context(base, '')
local out = {}
for _, jid in ipairs(ARGV) do
  local f = rcall('HMGET', k_job(base, jid), 'state', 'code', 'node', 'attempt', 'utt', 'tgt', 'result')
  if not f[1] then
    table.insert(out, { job = jid, state = 'missing' })
  else
    local item = { job = jid, state = f[1], code = f[2] or '', node = f[3] or '', attempt = tonumber(f[4]) or 0,
      utt = tonumber(f[5]) or 0, tgt = f[6] or '' }
    if f[7] then
      table.insert(ctx.payloads, f[7])
      item.p = #ctx.payloads
    end
    table.insert(out, item)
  end
end
return reply(ctx, { status = 'ok', jobs = (#out > 0) and out or nil })
