--[[
  Benchmark baseline: the cheapest script call there is. It touches no key and does no work, and
  answers a short JSON string shaped like the transition scripts' replies. Called exactly like them
  (FCALL of a function of its own library, through dragoman.store.scripts.Scripts), so the difference
  between this and a real transition is the cost of the transition itself.

  Input:
    KEYS[1] cell node registry "<base>nodes" (passed like every real script, never read)
  Output: JSON {status:"ok", effects:[], now:0}
]]
return '{"status":"ok","effects":[],"now":0}'
