--[[
  Finish a leased task, exactly once, recording its result in the same step.

  Input:
    KEYS[1]  leased zset      P:{Q}:L:leased
    KEYS[2]  done zset        P:{Q}:L:done
    KEYS[3]  counters hash    P:{Q}:L:counters
    KEYS[4]  tasks hash       P:{Q}:tasks
    KEYS[5]  attempts hash    P:{Q}:attempts
    KEYS[6]  scores hash      P:{Q}:scores
    KEYS[7]  leaseinfo hash   P:{Q}:leaseinfo
    KEYS[8]  costs hash       P:{Q}:costs
    KEYS[9]  limits hash      P:{Q}:limits
    KEYS[10] results hash     P:{Q}:results

    ARGV[1] task_id
    ARGV[2] '1' if the task failed, '0' if it succeeded
    ARGV[3] now_ms (0 = server clock): the score in the done set
    ARGV[4] holder: '' skips the check, else it must match the lease's holder
    ARGV[5] tokens the task really used ('' = unknown): the queue's token
            bucket gets back (or pays) the difference to what the take charged
    ARGV[6] '1' to record ARGV[7] as the task's result, '0' not to
    ARGV[7] the result text

  Output:
    'completed'    it was leased: now removed (fields and lease record deleted), added to done, its result recorded if given,
                   counters.done (or counters.failed) += 1
    'already'      it is in the done set (a duplicate complete changes nothing)
    'wrong_holder' leased by another holder: nothing changed
    'not_leased'   anything else (waiting, delayed, cancelled, unknown, reaped)
]]
-- @include common.lua
-- @include limits.lua

local id = ARGV[1]
local function ended_before()
  if redis.call('ZSCORE', KEYS[2], id) then
    return 'already'
  end
  return 'not_leased'
end
local rec
if ARGV[4] ~= '' or ARGV[5] ~= '' then
  -- the lease record is read only when a holder or tokens need it
  if not redis.call('ZSCORE', KEYS[1], id) then
    return ended_before()
  end
  rec = redis.call('HGET', KEYS[7], id)
  if not bq_holder_ok(rec, ARGV[4]) then
    return 'wrong_holder'
  end
end
if redis.call('ZREM', KEYS[1], id) == 0 then
  return ended_before()
end
local now = bq_now_ms(ARGV[3])
if ARGV[5] ~= '' then
  local lim = bq_limiter(9, 7, now)
  local _, _, charged = bq_parse_lease(rec)
  bq_correct(lim, charged or 0, tonumber(ARGV[5]))
  bq_save(lim)
end
bq_forget(4, {id})
redis.call('ZADD', KEYS[2], bq_fmt(now), id)
if ARGV[6] == '1' then
  redis.call('HSET', KEYS[10], id, ARGV[7])
end
if ARGV[2] == '1' then
  redis.call('HINCRBY', KEYS[3], 'failed', 1)
else
  redis.call('HINCRBY', KEYS[3], 'done', 1)
end
return 'completed'
