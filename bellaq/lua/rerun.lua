--[[
  Put a task that is done in the engine back to waiting, to run again: used when
  its complete reached the engine but its result never reached anyone (nothing
  recorded, nothing sent). A task not in the done set is left alone.

  Input:
    KEYS[1] waiting zset     P:{Q}:L:waiting
    KEYS[2] done zset        P:{Q}:L:done
    KEYS[3] tasks hash       P:{Q}:tasks
    KEYS[4] attempts hash    P:{Q}:attempts
    KEYS[5] scores hash      P:{Q}:scores
    KEYS[6] results hash     P:{Q}:results

    ARGV[1] task_id
    ARGV[2] payload
    ARGV[3] score: its original enqueue time in microseconds (keeps its place)
    ARGV[4] attempts already spent

  Output:
    1 if it is waiting again, 0 if it was not done
]]
local id = ARGV[1]
if redis.call('ZREM', KEYS[2], id) == 0 then
  return 0
end
redis.call('HDEL', KEYS[6], id)
redis.call('ZADD', KEYS[1], ARGV[3], id)
redis.call('HSET', KEYS[3], id, ARGV[2])
redis.call('HSET', KEYS[5], id, ARGV[3])
if tonumber(ARGV[4]) > 0 then
  redis.call('HSET', KEYS[4], id, ARGV[4])
else
  redis.call('HDEL', KEYS[4], id)
end
return 1
