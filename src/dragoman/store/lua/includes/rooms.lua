--[[
  Rooms: several sessions in one conversation, each hearing the others in its own language. A room
  lives in one cell (chosen by its code): "room:<code>" (its id, when it was made, its last speech,
  how many joined), "room:<code>:members" (session id -> member JSON: display_name, preferred_lang,
  lang (what it hears: its preferred_lang, else its session's target), prefs (raw voice
  preferences), joined_at, seq (its place in the order of joining: the room's "joins" count), proc),
  "rooms" (code -> expiry deadline) and "proc:<p>:rooms" ("code sid" of members on process p, so a
  dead process's members leave).

  Every change is sent to every member as a "room" effect (event "members", "expired" or
  "signal"), whatever process holds its socket; the member list itself is the payload.
]]

local function room_members(ctx, code)
  local raw = rcall('HGETALL', k_room_members(ctx.base, code))
  local out = {}
  for i = 2, #raw, 2 do table.insert(out, cjson.decode(raw[i])) end
  table.sort(out, function(a, b)  -- in the order they joined (two may join in the same millisecond)
    if (a.seq or 0) ~= (b.seq or 0) then return (a.seq or 0) < (b.seq or 0) end
    if (a.joined_at or 0) ~= (b.joined_at or 0) then return (a.joined_at or 0) < (b.joined_at or 0) end
    return a.session_id < b.session_id
  end)
  return out
end

local function room_broadcast(ctx, code, members)
  local list = {}
  for _, m in ipairs(members) do
    table.insert(list, { session_id = m.session_id, display_name = m.display_name,
      preferred_lang = m.preferred_lang, prefs = m.prefs, joined_at = m.joined_at })
  end
  local payload = cjson.encode(list)
  for _, m in ipairs(members) do
    emit(ctx, m.proc, { kind = 'room', event = 'members', room = code, session = m.session_id }, payload)
  end
end

-- A member leaves (asked, its socket closed, its process died): the others hear of it; the last
-- one out deletes the room.
local function room_remove(ctx, code, sid)
  local mk = k_room_members(ctx.base, code)
  local raw = rcall('HGET', mk, sid)
  if not raw then return false end
  local m = cjson.decode(raw)
  rcall('HDEL', mk, sid)
  if m.proc and m.proc ~= '' then rcall('SREM', k_proc_rooms(ctx.base, m.proc), code .. ' ' .. sid) end
  if rcall('HLEN', mk) == 0 then
    rcall('DEL', k_room(ctx.base, code), mk)
    rcall('ZREM', k_rooms(ctx.base), code)
  else
    room_broadcast(ctx, code, room_members(ctx, code))
  end
  return true
end

local function room_expire(ctx, code)
  for _, m in ipairs(room_members(ctx, code)) do
    emit(ctx, m.proc, { kind = 'room', event = 'expired', room = code, session = m.session_id })
    if m.proc and m.proc ~= '' then rcall('SREM', k_proc_rooms(ctx.base, m.proc), code .. ' ' .. m.session_id) end
  end
  rcall('DEL', k_room(ctx.base, code), k_room_members(ctx.base, code))
  rcall('ZREM', k_rooms(ctx.base), code)
end
