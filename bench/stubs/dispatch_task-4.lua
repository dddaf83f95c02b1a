--[[
  Benchmark stub for dispatch_task (diagnostics only): same KEYS/ARGV as the real script, touches no
  key, answers a canned "assigned" reply of the real reply's shape and size. Pairs measured through
  Store with these stubs show what the client path alone allows (the Lua cost taken out).
]]
return { '{"state":"assigned","status":"assigned","now":1796031123914,"code":"","attempt":1,"node":"node-00000"}',
  '[{"kind":"assign","lease":1796031183914,"tgt":"' .. ARGV[6] .. '","job":"' .. ARGV[2] .. '","utt":' .. ARGV[5] ..
  ',"session":"' .. ARGV[4] .. '","attempt":1,"node":"node-00000","p":-1}]' }
