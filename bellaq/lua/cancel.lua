--[[
  Cancel a task: a waiting or delayed one never runs; a leased (running) one
  is dropped, so its late complete answers 'not_leased'.

  Input:
    KEYS[1]  waiting zset     P:{Q}:L:waiting
    KEYS[2]  leased zset      P:{Q}:L:leased
    KEYS[3]  delayed zset     P:{Q}:L:delayed
    KEYS[4]  counters hash    P:{Q}:L:counters
    KEYS[5]  tasks hash       P:{Q}:tasks
    KEYS[6]  attempts hash    P:{Q}:attempts
    KEYS[7]  scores hash      P:{Q}:scores
    KEYS[8]  leaseinfo hash   P:{Q}:leaseinfo
    KEYS[9]  costs hash       P:{Q}:costs

    ARGV[1] task_id

  Output:
    'waiting' | 'leased' | 'delayed' where it was removed from (fields
    deleted, counters.cancelled += 1), or 'absent' (nothing changed)
]]
-- @include common.lua

local id = ARGV[1]
local where
if redis.call('ZREM', KEYS[1], id) == 1 then
  where = 'waiting'
elseif redis.call('ZREM', KEYS[2], id) == 1 then
  where = 'leased'
elseif redis.call('ZREM', KEYS[3], id) == 1 then
  where = 'delayed'
else
  return 'absent'
end
bq_forget(5, {id})
redis.call('HINCRBY', KEYS[4], 'cancelled', 1)
return where
