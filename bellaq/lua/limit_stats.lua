--[[
  How much of a queue's limits is in use, read in one atomic step.

  Input:
    KEYS[1] limits hash    P:{Q}:limits
    KEYS[2] leaseinfo hash P:{Q}:leaseinfo (in flight: its length)

    ARGV[1] now_ms (0 = server clock)

  Output (strings; '' = no such limit):
    {rpm, tpm, max_in_flight, burst_ms, in_flight, paused_until, factor,
     requests_available, tokens_available, window_start, window_requests,
     window_tokens}
    in_flight: leased tasks of the queue, every level; paused_until: 0 when
    not paused; *_available: bucket levels now (may be negative: a debt);
    window_*: requests and tokens charged in the one-minute window from
    window_start (zeros and now when no window is open).
]]
-- @include common.lua
-- @include limits.lua

local now = bq_now_ms(ARGV[1])
local lim = bq_limiter(1, 2, now)
local function opt(v, fmt)
  if v == nil then
    return ''
  end
  return string.format(fmt, v)
end
local win = lim.win or {now, 0, 0}
return {opt(lim.rpm, '%.0f'), opt(lim.tpm, '%.0f'), opt(lim.mif, '%.0f'), opt(lim.burst, '%.0f'),
        bq_fmt(redis.call('HLEN', KEYS[2])), bq_fmt(lim.paused > now and lim.paused or 0),
        opt(lim.factor or 1, '%.6f'), opt(lim.req and lim.req.level, '%.17g'),
        opt(lim.tok and lim.tok.level, '%.17g'), bq_fmt(win[1]), bq_fmt(win[2]), bq_fmt(win[3])}
