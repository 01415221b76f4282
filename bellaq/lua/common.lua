--[[
  Shared helpers, not a script of its own.

  Scripts pull this file in by textual inclusion: QueueEngine replaces a line
  `-- @include common.lua` with this file's contents when it loads the scripts,
  so the SHA that Redis sees is that of the expanded text.

  bq_now_ms(arg)       -> the explicit time `arg` in ms when it is a number > 0,
                          else the server clock (TIME; fine with effect
                          replication, the default since Redis 5).
  bq_fmt(n)            -> n as an integer string (no exponent, no precision loss).
  bq_lease(base, qi, id, deadline, retries, out)
                       -> lease task `id` (already removed from waiting) of the
                          queue whose take keys start at KEYS[base]
                          (waiting, leased, tasks, attempts, retries) and append
                          {qi, id, payload, attempts} to `out`.
]]
local function bq_now_ms(arg)
  local n = tonumber(arg)
  if n and n > 0 then
    return n
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function bq_fmt(n)
  return string.format('%.0f', n)
end

local function bq_lease(base, qi, id, deadline, retries, out)
  redis.call('ZADD', KEYS[base + 1], deadline, id)
  local attempts = redis.call('HINCRBY', KEYS[base + 3], id, 1)
  redis.call('HSET', KEYS[base + 4], id, retries)
  local payload = redis.call('HGET', KEYS[base + 2], id)
  out[#out + 1] = qi
  out[#out + 1] = id
  out[#out + 1] = payload or ''
  out[#out + 1] = attempts
end
