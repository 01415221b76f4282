--[[
  Cancel a task: a waiting one never runs; a leased (running) one is dropped,
  so its late complete answers 'not_leased'.

  Input:
    KEYS[1] waiting zset   P:{Q}:L:waiting
    KEYS[2] leased zset    P:{Q}:L:leased
    KEYS[3] counters hash  P:{Q}:L:counters
    KEYS[4] tasks hash     P:{Q}:tasks
    KEYS[5] attempts hash  P:{Q}:attempts
    KEYS[6] scores hash    P:{Q}:scores
    KEYS[7] retries hash   P:{Q}:retries

    ARGV[1] task_id

  Output:
    'waiting' | 'leased' where it was removed from (fields deleted,
    counters.cancelled += 1), or 'absent' (nothing changed)
]]
local id = ARGV[1]
local where
if redis.call('ZREM', KEYS[1], id) == 1 then
  where = 'waiting'
elseif redis.call('ZREM', KEYS[2], id) == 1 then
  where = 'leased'
else
  return 'absent'
end
redis.call('HDEL', KEYS[4], id)
redis.call('HDEL', KEYS[5], id)
redis.call('HDEL', KEYS[6], id)
redis.call('HDEL', KEYS[7], id)
redis.call('HINCRBY', KEYS[3], 'cancelled', 1)
return where
