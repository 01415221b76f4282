--[[
  Set a queue's limits (every level shares them), replacing the previous
  configuration. A limit given as '' is removed with its bucket. The pause in
  force, the window counters and the buckets of limits kept stay as they are
  (a bucket holding more than its new capacity is cut to it at the next take).

  Input:
    KEYS[1] limits hash   P:{Q}:limits

    ARGV[1] rpm            requests per minute ('' = none)
    ARGV[2] tpm            tokens per minute ('' = none)
    ARGV[3] max_in_flight  leased tasks of the queue at once ('' = none)
    ARGV[4] burst_ms       each bucket holds this many ms of its rate

  Output:
    1
]]
local config = {'rpm', 'tpm', 'max_in_flight', 'burst_ms'}
for i, field in ipairs(config) do
  if ARGV[i] == '' then
    redis.call('HDEL', KEYS[1], field)
  else
    redis.call('HSET', KEYS[1], field, ARGV[i])
  end
end
if ARGV[1] == '' then
  redis.call('HDEL', KEYS[1], 'req', 'req_ts')
end
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], 'tok', 'tok_ts')
end
if ARGV[1] == '' and ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], 'factor', 'factor_ts')
end
return 1
