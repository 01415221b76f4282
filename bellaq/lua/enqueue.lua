--[[
  Add tasks to the waiting set of one (queue, level), skipping any id that is
  already waiting, leased, delayed or recently done (so a re-seed never
  duplicates).

  Input:
    KEYS[1] waiting zset     P:{Q}:L:waiting
    KEYS[2] leased zset      P:{Q}:L:leased
    KEYS[3] delayed zset     P:{Q}:L:delayed
    KEYS[4] done zset        P:{Q}:L:done
    KEYS[5] tasks hash       P:{Q}:tasks
    KEYS[6] attempts hash    P:{Q}:attempts
    KEYS[7] scores hash      P:{Q}:scores
    KEYS[8] leaseinfo hash   P:{Q}:leaseinfo
    KEYS[9] costs hash       P:{Q}:costs

    ARGV    groups of 5, one per task: task_id, payload, score, attempts, cost
            (score: enqueue time in microseconds, as a decimal string;
             attempts: takes already spent, 0 for a new task;
             cost: estimated tokens, charged by takes under a tpm limit)

  Output:
    number of tasks newly added
]]
local added = 0
for i = 1, #ARGV, 5 do
  local id = ARGV[i]
  if not redis.call('ZSCORE', KEYS[1], id)
      and not redis.call('ZSCORE', KEYS[2], id)
      and not redis.call('ZSCORE', KEYS[3], id)
      and not redis.call('ZSCORE', KEYS[4], id) then
    local score = ARGV[i + 2]
    redis.call('ZADD', KEYS[1], score, id)
    redis.call('HSET', KEYS[5], id, ARGV[i + 1])
    redis.call('HSET', KEYS[7], id, score)
    if tonumber(ARGV[i + 3]) > 0 then
      redis.call('HSET', KEYS[6], id, ARGV[i + 3])
    else
      redis.call('HDEL', KEYS[6], id)
    end
    redis.call('HDEL', KEYS[8], id)
    if tonumber(ARGV[i + 4]) > 0 then
      redis.call('HSET', KEYS[9], id, ARGV[i + 4])
    else
      redis.call('HDEL', KEYS[9], id)
    end
    added = added + 1
  end
end
return added
