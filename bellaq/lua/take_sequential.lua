--[[
  At most one leased task per listed queue: a queue with any leased task
  (even one whose deadline has passed but that requeue_expired has not
  reaped yet) gives nothing; any other queue gives at most one, its oldest.
  Queues are visited in the listed order until size tasks are taken, so at
  most N tasks are returned. Each taken task moves waiting -> leased as in
  take_fifo.

  Input (N listed queues, each with 5 keys in this fixed stride):
    KEYS[5*(i-1)+1] waiting zset of queue i   P:{Q}:L:waiting
    KEYS[5*(i-1)+2] leased zset of queue i    P:{Q}:L:leased
    KEYS[5*(i-1)+3] tasks hash of queue i     P:{Q}:tasks
    KEYS[5*(i-1)+4] attempts hash of queue i  P:{Q}:attempts
    KEYS[5*(i-1)+5] retries hash of queue i   P:{Q}:retries

    ARGV[1] now_ms       explicit time in ms, or 0 for the server clock
    ARGV[2] timeout_ms   lease length: deadline = now + timeout_ms
    ARGV[3] max_retries  stored per leased task (-1 = unlimited)
    ARGV[4] size         most tasks to take (1..10000, checked by the caller)
    ARGV[5] N            number of listed queues

  Output:
    flat array, 4 items per taken task, in the order they were chosen:
    queue_index (1-based position in the list), task_id, payload, attempts
    (attempts counts this take too).
]]
-- @include common.lua

local now = bq_now_ms(ARGV[1])
local deadline = bq_fmt(now + tonumber(ARGV[2]))
local retries = ARGV[3]
local size = tonumber(ARGV[4])
local nq = tonumber(ARGV[5])
local out = {}
local taken = 0

for q = 1, nq do
  if taken >= size then
    break
  end
  local base = (q - 1) * 5 + 1
  if redis.call('ZCARD', KEYS[base + 1]) == 0 then
    local r = redis.call('ZPOPMIN', KEYS[base])
    if #r > 0 then
      bq_lease(base, q, r[1], deadline, retries, out)
      taken = taken + 1
    end
  end
end
return out
