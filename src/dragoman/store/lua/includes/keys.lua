--[[
  Key names derived inside scripts. Mirrors dragoman/store/keys.py (a test compares the two).
  Every name starts with the cell base "PREFIX:{CELL}:", so all keys of a cell share one hash slot.
]]
local function k_node(base, nid) return base .. 'node:' .. nid end
local function k_pool(base, pid) return base .. 'pool:' .. pid end
local function k_queue(base, pid) return base .. 'queue:' .. pid end
local function k_job(base, jid) return base .. 'job:' .. jid end
local function k_sess(base, sid) return base .. 'sess:' .. sid end
local function k_inbox(base, proc) return base .. 'inbox:' .. proc end
local function k_proc_nodes(base, proc) return base .. 'proc:' .. proc .. ':nodes' end
local function k_proc_sessions(base, proc) return base .. 'proc:' .. proc .. ':sessions' end
local function k_reply(base, call_id) return base .. 'reply:' .. call_id end
local function k_room(base, code) return base .. 'room:' .. code end
local function k_room_members(base, code) return base .. 'room:' .. code .. ':members' end
local function k_proc_rooms(base, proc) return base .. 'proc:' .. proc .. ':rooms' end
local function k_nodes(base) return base .. 'nodes' end
local function k_pools(base) return base .. 'pools' end
local function k_pools_gone(base) return base .. 'pools_gone' end
local function k_leases(base) return base .. 'leases' end
local function k_pending(base) return base .. 'pending' end
local function k_orphans(base) return base .. 'orphans' end
local function k_stats(base) return base .. 'stats' end
local function k_events(base) return base .. 'events' end
local function k_procs(base) return base .. 'procs' end
local function k_clock(base) return base .. 'clock' end
local function k_offline(base) return base .. 'offline' end
local function k_boot(base) return base .. 'boot' end
local function k_rooms(base) return base .. 'rooms' end
