--[[
  Remove up to `limit` WAITING or DELAYED tasks of one (queue, level), oldest
  waiting first, then delayed by due time (leased tasks are left alone). The
  caller repeats until fewer than `limit` come back, so a huge queue never
  blocks Redis in one call.

  Input:
    KEYS[1] waiting zset     P:{Q}:L:waiting
    KEYS[2] delayed zset     P:{Q}:L:delayed
    KEYS[3] counters hash    P:{Q}:L:counters
    KEYS[4] tasks hash       P:{Q}:tasks
    KEYS[5] attempts hash    P:{Q}:attempts
    KEYS[6] scores hash      P:{Q}:scores
    KEYS[7] leaseinfo hash   P:{Q}:leaseinfo
    KEYS[8] costs hash       P:{Q}:costs

    ARGV[1] limit (>= 1)

  Output:
    array of removed task ids (counters.cancelled += their number)
]]
-- @include common.lua

local limit = tonumber(ARGV[1])
local removed = {}
for k = 1, 2 do
  if #removed < limit then
    local ids = redis.call('ZRANGE', KEYS[k], 0, limit - #removed - 1)
    for i = 1, #ids, 500 do
      redis.call('ZREM', KEYS[k], unpack(ids, i, math.min(i + 499, #ids)))
    end
    for _, id in ipairs(ids) do
      removed[#removed + 1] = id
    end
  end
end
bq_forget(4, removed)
if #removed > 0 then
  redis.call('HINCRBY', KEYS[3], 'cancelled', #removed)
end
return removed
