--[[
  Reap leases whose deadline has passed (deadline <= now), oldest deadline
  first, at most `limit` of them:
    - retries ~= -1 and attempts > retries: the task failed (removed from the
      engine with its fields, counters.failed += 1, NOT added to done);
    - otherwise it goes back to waiting at its original enqueue score (so it
      keeps its place, oldest first); attempts are kept.
  Also trims the done set of entries older than done_ttl_ms.

  Input:
    KEYS[1] waiting zset   P:{Q}:L:waiting
    KEYS[2] leased zset    P:{Q}:L:leased
    KEYS[3] done zset      P:{Q}:L:done
    KEYS[4] counters hash  P:{Q}:L:counters
    KEYS[5] tasks hash     P:{Q}:tasks
    KEYS[6] attempts hash  P:{Q}:attempts
    KEYS[7] scores hash    P:{Q}:scores
    KEYS[8] retries hash   P:{Q}:retries

    ARGV[1] now_ms (0 = server clock)
    ARGV[2] limit: most leases reaped by this call
    ARGV[3] done_ttl_ms: done entries older than this are trimmed

  Output:
    { {requeued task ids...}, {failed task ids...} }
]]
-- @include common.lua

local now = bq_now_ms(ARGV[1])
local limit = tonumber(ARGV[2])
local requeued, failed = {}, {}

local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', bq_fmt(now), 'LIMIT', 0, limit)
for _, id in ipairs(expired) do
  redis.call('ZREM', KEYS[2], id)
  local attempts = tonumber(redis.call('HGET', KEYS[6], id)) or 0
  local retries = tonumber(redis.call('HGET', KEYS[8], id)) or -1
  redis.call('HDEL', KEYS[8], id)
  if retries ~= -1 and attempts > retries then
    redis.call('HDEL', KEYS[5], id)
    redis.call('HDEL', KEYS[6], id)
    redis.call('HDEL', KEYS[7], id)
    redis.call('HINCRBY', KEYS[4], 'failed', 1)
    failed[#failed + 1] = id
  else
    local score = redis.call('HGET', KEYS[7], id)
    if not score then
      score = bq_fmt(now * 1000)
      redis.call('HSET', KEYS[7], id, score)
    end
    redis.call('ZADD', KEYS[1], score, id)
    requeued[#requeued + 1] = id
  end
end

redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. bq_fmt(now - tonumber(ARGV[3])))
return {requeued, failed}
