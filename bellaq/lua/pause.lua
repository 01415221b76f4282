--[[
  Pause a queue (every level, every taker on every host): no take leases any
  of its tasks before now + pause_ms. A pause never shortens a longer one in
  force. With `throttled` (the upstream answered 429) and a rate limit set,
  the first signal of an episode (one that arrives while the queue is not
  paused yet) also halves the AIMD factor on its rates (see limits.lua).

  Input:
    KEYS[1] limits hash    P:{Q}:limits
    KEYS[2] leaseinfo hash P:{Q}:leaseinfo (in flight: its length)

    ARGV[1] now_ms (0 = server clock)
    ARGV[2] pause_ms (>= 0)
    ARGV[3] '1' throttled (slow down), '0' not

  Output:
    the time the pause in force ends (ms since the epoch)
]]
-- @include common.lua
-- @include limits.lua

local now = bq_now_ms(ARGV[1])
local lim = bq_limiter(1, 2, now)
if ARGV[3] == '1' and lim.paused <= now and (lim.rpm or lim.tpm) then
  lim.factor = math.max(BQ_MIN_FACTOR, lim.factor * BQ_MD)
  lim.dirty = true
  bq_save(lim)
end
local untl = now + tonumber(ARGV[2])
if untl > lim.paused then
  redis.call('HSET', KEYS[1], 'paused_until', bq_fmt(untl))
  return untl
end
return lim.paused
