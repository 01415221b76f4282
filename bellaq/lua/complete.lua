--[[
  Finish a leased task, exactly once.

  Input:
    KEYS[1] leased zset    P:{Q}:L:leased
    KEYS[2] done zset      P:{Q}:L:done
    KEYS[3] counters hash  P:{Q}:L:counters
    KEYS[4] tasks hash     P:{Q}:tasks
    KEYS[5] attempts hash  P:{Q}:attempts
    KEYS[6] scores hash    P:{Q}:scores
    KEYS[7] retries hash   P:{Q}:retries

    ARGV[1] task_id
    ARGV[2] '1' if the task failed, '0' if it succeeded
    ARGV[3] now_ms (0 = server clock): the score in the done set

  Output:
    'completed'  it was leased: now removed, its fields deleted, added to
                 done, counters.done (or counters.failed) += 1
    'already'    it is in the done set (a duplicate complete changes nothing)
    'not_leased' anything else (waiting, cancelled, unknown, lease ran out)
]]
-- @include common.lua

local id = ARGV[1]
if redis.call('ZREM', KEYS[1], id) == 1 then
  redis.call('HDEL', KEYS[4], id)
  redis.call('HDEL', KEYS[5], id)
  redis.call('HDEL', KEYS[6], id)
  redis.call('HDEL', KEYS[7], id)
  redis.call('ZADD', KEYS[2], bq_fmt(bq_now_ms(ARGV[3])), id)
  if ARGV[2] == '1' then
    redis.call('HINCRBY', KEYS[3], 'failed', 1)
  else
    redis.call('HINCRBY', KEYS[3], 'done', 1)
  end
  return 'completed'
end
if redis.call('ZSCORE', KEYS[2], id) then
  return 'already'
end
return 'not_leased'
