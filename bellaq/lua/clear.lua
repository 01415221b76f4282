--[[
  Remove up to `limit` WAITING tasks of one (queue, level), oldest first
  (leased tasks are left alone). The caller repeats until fewer than `limit`
  come back, so a huge queue never blocks Redis in one call.

  Input:
    KEYS[1] waiting zset   P:{Q}:L:waiting
    KEYS[2] counters hash  P:{Q}:L:counters
    KEYS[3] tasks hash     P:{Q}:tasks
    KEYS[4] attempts hash  P:{Q}:attempts
    KEYS[5] scores hash    P:{Q}:scores
    KEYS[6] retries hash   P:{Q}:retries

    ARGV[1] limit (>= 1)

  Output:
    array of removed task ids (counters.cancelled += their number)
]]
local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
local n = #ids
local step = 500
for i = 1, n, step do
  local j = math.min(i + step - 1, n)
  redis.call('ZREM', KEYS[1], unpack(ids, i, j))
  redis.call('HDEL', KEYS[3], unpack(ids, i, j))
  redis.call('HDEL', KEYS[4], unpack(ids, i, j))
  redis.call('HDEL', KEYS[5], unpack(ids, i, j))
  redis.call('HDEL', KEYS[6], unpack(ids, i, j))
end
if n > 0 then
  redis.call('HINCRBY', KEYS[2], 'cancelled', n)
end
return ids
