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
--- @include "includes/jobs"

local base = base_of(KEYS[1])
local ctx = new_context(base, '')
local out = {}
for _, jid in ipairs(ARGV) do
  local j = job_fields(ctx, jid)
  if not j then
    table.insert(out, { job = jid, state = 'missing' })
  else
    local f = rcall('HMGET', j.key, 'code', 'result')
    local item = { job = jid, state = j.state, code = f[1] or '', node = j.node, attempt = j.attempt, utt = j.utt,
      tgt = j.tgt }
    if f[2] then
      table.insert(ctx.payloads, f[2])
      item.p = #ctx.payloads
    end
    table.insert(out, item)
  end
end
return reply(ctx, { status = 'ok', jobs = (#out > 0) and out or nil })
