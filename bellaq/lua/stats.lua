--[[
  Counts of one (queue, level), read in one atomic step.

  Input:
    KEYS[1] waiting zset   P:{Q}:L:waiting
    KEYS[2] leased zset    P:{Q}:L:leased
    KEYS[3] delayed zset   P:{Q}:L:delayed
    KEYS[4] counters hash  P:{Q}:L:counters

    ARGV[1] now_ms (0 = server clock)

  Output:
    {waiting, running, done, failed, cancelled, oldest_age_ms, delayed,
     next_due_in_ms}
    oldest_age_ms: now - the oldest waiting task's score (microseconds / 1000),
    0 when nothing waits (never negative).
    next_due_in_ms: ms until the earliest delayed task is due (0 if overdue),
    -1 when nothing is delayed.
]]
-- @include common.lua

local now = bq_now_ms(ARGV[1])
local waiting = redis.call('ZCARD', KEYS[1])
local running = redis.call('ZCARD', KEYS[2])
local delayed = redis.call('ZCARD', KEYS[3])
local c = redis.call('HMGET', KEYS[4], 'done', 'failed', 'cancelled')
local age = 0
local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #head > 0 then
  age = math.max(0, math.floor(now - tonumber(head[2]) / 1000))
end
local due = -1
local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
if #first > 0 then
  due = math.max(0, tonumber(first[2]) - now)
end
return {waiting, running, tonumber(c[1]) or 0, tonumber(c[2]) or 0, tonumber(c[3]) or 0, age, delayed, due}
