--[[
  Every change to a room, one transition each (ARGV[2] names it), atomic within the room's cell:
    "create"  make the room with the caller as its first member (a code in use: "collision", the
              caller picks another);
    "join"    add the caller (ROOM_NOT_FOUND, ALREADY_IN_ROOM, ROOM_FULL at room_max_members);
    "leave"   remove the caller (NOT_IN_ROOM); the last one out deletes the room;
    "prefer"  set whether the caller receives a member's original voice;
    "speak"   the caller speaks: the room's expiry moves on; answers the members (for the fan-out);
    "signal"  WebRTC signalling to one member, unless that member refuses the caller's raw voice.
  Every change is sent to every member (a "room" effect; see includes/rooms.lua).

  Input:
    KEYS[1] cell node registry "<base>nodes"
    KEYS[2] room hash          "<base>room:<code>"
    KEYS[3] room members       "<base>room:<code>:members"
    ARGV[1] calling process id
    ARGV[2] "create" | "join" | "leave" | "prefer" | "speak" | "signal"
    ARGV[3] room code (6 digits)
    ARGV[4] the caller's session id
    ARGV[5] create/join: the member (JSON: display_name?, preferred_lang?, lang); prefer: the other
            member's session id; signal: the member it is for
    ARGV[6] create: the room id; join: room_max_members; prefer: "1" receive, "0" not; signal: the
            message (JSON)
    ARGV[7] room expiry ms (create, speak)
    ARGV[8] call id: a retry after a lost reply gets the same reply again (I8: a repeated create
            would otherwise answer "collision", a repeated join ALREADY_IN_ROOM, a repeated leave
            NOT_IN_ROOM, and a repeated signal would be relayed twice). "speak" keeps no reply: it
            has no effects and its repeat answers the same (it is on every utterance's path).
  Output: [body, effects, payloads...], body {status, code?, room_id?, members?, now}
    status "created" | "collision" | "joined" | "left" | "ok" | "refused" | "error" (code: a room error code)
]]
--- @include "includes/keys"
--- @include "includes/context"
--- @include "includes/rooms"

local base = base_of(KEYS[1])
local op, code, sid = ARGV[2], ARGV[3], ARGV[4]
if not string.match(code, '^%d%d%d%d%d%d$') then error('ERR dragoman: a room code is 6 digits') end
if KEYS[2] ~= k_room(base, code) or KEYS[3] ~= k_room_members(base, code) then
  error('ERR dragoman: room keys do not match the room code')
end
if sid == '' then error('ERR dragoman: the session must be named') end
local ctx = new_context(base, ARGV[1])
local mk = KEYS[3]
if op ~= 'speak' then
  local again = replay(ctx, ARGV[8], true)
  if again then return again end
end

local function fail(err) return reply(ctx, { status = 'error', code = err }) end

if op == 'create' then
  local expiry = need_number(ARGV[7], 'room expiry ms', 1)
  if rcall('EXISTS', KEYS[2]) == 1 then return reply(ctx, { status = 'collision' }) end
  local m = cjson.decode(ARGV[5])
  m.session_id, m.proc, m.joined_at, m.prefs, m.seq = sid, ctx.proc, ctx.now, {}, 1
  rcall('HSET', KEYS[2], 'code', code, 'id', ARGV[6], 'created', ctx.now, 'last_speech', ctx.now, 'joins', 1)
  rcall('HSET', mk, sid, cjson.encode(m))
  rcall('ZADD', k_rooms(base), ctx.now + expiry, code)
  rcall('SADD', k_proc_rooms(base, ctx.proc), code .. ' ' .. sid)
  room_broadcast(ctx, code, { m })
  return reply(ctx, { status = 'created', room_id = ARGV[6] })
end

if rcall('EXISTS', KEYS[2]) == 0 then return fail('ROOM_NOT_FOUND') end

if op == 'join' then
  local max = need_number(ARGV[6], 'room_max_members', 1)
  if rcall('HEXISTS', mk, sid) == 1 then return fail('ALREADY_IN_ROOM') end
  if rcall('HLEN', mk) >= max then return fail('ROOM_FULL') end
  local m = cjson.decode(ARGV[5])
  m.session_id, m.proc, m.joined_at, m.prefs = sid, ctx.proc, ctx.now, {}
  m.seq = rcall('HINCRBY', KEYS[2], 'joins', 1)
  rcall('HSET', mk, sid, cjson.encode(m))
  rcall('SADD', k_proc_rooms(base, ctx.proc), code .. ' ' .. sid)
  room_broadcast(ctx, code, room_members(ctx, code))
  return reply(ctx, { status = 'joined', room_id = rcall('HGET', KEYS[2], 'id') })
end

local raw = rcall('HGET', mk, sid)
if not raw then return fail('NOT_IN_ROOM') end

if op == 'leave' then
  room_remove(ctx, code, sid)
  return reply(ctx, { status = 'left' })
end

if op == 'prefer' then
  local m = cjson.decode(raw)
  if type(m.prefs) ~= 'table' then m.prefs = {} end
  m.prefs[ARGV[5]] = ARGV[6] == '1'
  rcall('HSET', mk, sid, cjson.encode(m))
  room_broadcast(ctx, code, room_members(ctx, code))
  return reply(ctx, { status = 'ok' })
end

if op == 'speak' then
  local expiry = need_number(ARGV[7], 'room expiry ms', 1)
  rcall('HSET', KEYS[2], 'last_speech', ctx.now)
  rcall('ZADD', k_rooms(base), ctx.now + expiry, code)
  return reply(ctx, { status = 'ok', members = room_members(ctx, code) })
end

if op == 'signal' then
  local target = rcall('HGET', mk, ARGV[5])
  if not target then return fail('NOT_IN_ROOM') end
  local t = cjson.decode(target)
  if type(t.prefs) == 'table' and t.prefs[sid] == false then return reply(ctx, { status = 'refused' }) end
  emit(ctx, t.proc, { kind = 'room', event = 'signal', room = code, session = ARGV[5], sender = sid }, ARGV[6])
  return reply(ctx, { status = 'ok' })
end

error('ERR dragoman: unknown room operation ' .. op)
