--[[
  The reaper's step for one (queue, level). Reaps leases whose deadline has
  passed (deadline <= now), oldest deadline first, at most `limit` of them:
    - max retries ~= -1 and attempts > max retries: the task failed (removed
      from the engine with its fields, counters.failed += 1, NOT added to done);
    - otherwise it goes back to waiting at its original enqueue score (so it
      keeps its place, oldest first); attempts are kept.
  Either way its lease record goes (so it is no longer in flight). Then moves up to `limit` due delayed
  tasks back to waiting at their original scores, and trims the done set (and
  the recorded results of what it trims) of entries older than done_ttl_ms,
  at most BQ_TRIM per call.

  Input:
    KEYS[1]  waiting zset     P:{Q}:L:waiting
    KEYS[2]  leased zset      P:{Q}:L:leased
    KEYS[3]  delayed zset     P:{Q}:L:delayed
    KEYS[4]  done zset        P:{Q}:L:done
    KEYS[5]  counters hash    P:{Q}:L:counters
    KEYS[6]  tasks hash       P:{Q}:tasks
    KEYS[7]  attempts hash    P:{Q}:attempts
    KEYS[8]  scores hash      P:{Q}:scores
    KEYS[9]  leaseinfo hash   P:{Q}:leaseinfo
    KEYS[10] costs hash       P:{Q}:costs
    KEYS[11] results hash     P:{Q}:results
    KEYS[12] limits hash      P:{Q}:limits (its due:<level> field, see limits.lua)

    ARGV[1] now_ms (0 = server clock)
    ARGV[2] limit: most leases reaped, and most delayed tasks promoted
    ARGV[3] done_ttl_ms: done entries older than this are trimmed
    ARGV[4] the level L

  Output:
    { {requeued task ids...}, {failed task ids...}, {promoted task ids...} }
]]
-- @include common.lua

local BQ_TRIM = 5000
local now = bq_now_ms(ARGV[1])
local limit = tonumber(ARGV[2])
local requeued, failed = {}, {}

local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', bq_fmt(now), 'LIMIT', 0, limit)
for _, id in ipairs(expired) do
  redis.call('ZREM', KEYS[2], id)
  local attempts = tonumber(redis.call('HGET', KEYS[7], id)) or 0
  local _, retries = bq_parse_lease(redis.call('HGET', KEYS[9], id))
  retries = retries or -1
  if retries ~= -1 and attempts > retries then
    failed[#failed + 1] = id
  else
    redis.call('HDEL', KEYS[9], id)
    bq_requeue(1, 8, id, now)
    requeued[#requeued + 1] = id
  end
end
bq_forget(6, failed)
if #failed > 0 then
  redis.call('HINCRBY', KEYS[5], 'failed', #failed)
end

local promoted = bq_promote(3, 1, 8, 12, ARGV[4], now, limit)

local cutoff = '(' .. bq_fmt(now - tonumber(ARGV[3]))
if redis.call('HLEN', KEYS[11]) == 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', cutoff)
else
  local old = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', cutoff, 'LIMIT', 0, BQ_TRIM)
  for i = 1, #old, 500 do
    local j = math.min(i + 499, #old)
    redis.call('ZREM', KEYS[4], unpack(old, i, j))
    redis.call('HDEL', KEYS[11], unpack(old, i, j))
  end
end
return {requeued, failed, promoted}
