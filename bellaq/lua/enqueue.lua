--[[
  Add tasks to the waiting set of one (queue, level), skipping any id that is
  already waiting, leased or recently done (so a re-seed never duplicates).

  Input:
    KEYS[1] waiting zset   P:{Q}:L:waiting
    KEYS[2] leased zset    P:{Q}:L:leased
    KEYS[3] done zset      P:{Q}:L:done
    KEYS[4] tasks hash     P:{Q}:tasks
    KEYS[5] attempts hash  P:{Q}:attempts
    KEYS[6] scores hash    P:{Q}:scores
    KEYS[7] retries hash   P:{Q}:retries

    ARGV    groups of 4, one per task: task_id, payload, score, attempts
            (score: enqueue time in microseconds, as a decimal string;
             attempts: takes already spent, 0 for a new task)

  Output:
    number of tasks newly added
]]
local added = 0
for i = 1, #ARGV, 4 do
  local id = ARGV[i]
  if not redis.call('ZSCORE', KEYS[1], id)
      and not redis.call('ZSCORE', KEYS[2], id)
      and not redis.call('ZSCORE', KEYS[3], id) then
    local score = ARGV[i + 2]
    redis.call('ZADD', KEYS[1], score, id)
    redis.call('HSET', KEYS[4], id, ARGV[i + 1])
    redis.call('HSET', KEYS[6], id, score)
    if tonumber(ARGV[i + 3]) > 0 then
      redis.call('HSET', KEYS[5], id, ARGV[i + 3])
    else
      redis.call('HDEL', KEYS[5], id)
    end
    redis.call('HDEL', KEYS[7], id)
    added = added + 1
  end
end
return added
