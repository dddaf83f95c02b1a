--[[
  Benchmark stub for complete_task (diagnostics only): same KEYS/ARGV as the real script, touches no
  key, answers a canned "completed" reply of the real reply's shape and size.
]]
return { '{"now":1796031123915,"state":"completed","status":"completed"}',
  '[{"kind":"outcome","code":"","job":"' .. ARGV[2] .. '","utt":0,"node":"' .. ARGV[3] ..
  '","state":"completed","session":"stub","tgt":"en","attempt":' .. ARGV[4] .. ',"p":-1}]' }
