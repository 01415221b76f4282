--[[
  What the four take_*.lua share (not a script of its own; included after
  common.lua and limits.lua). Each take script documents its strategy; they
  all take these KEYS and ARGV and answer this output:

  Input (N listed queues, each with 9 keys in this fixed stride, b = 9*(i-1)):
    KEYS[b+1]  waiting zset of queue i    P:{Q}:L:waiting
    KEYS[b+2]  leased zset of queue i     P:{Q}:L:leased
    KEYS[b+3]  delayed zset of queue i    P:{Q}:L:delayed
    KEYS[b+4]  tasks hash                 P:{Q}:tasks
    KEYS[b+5]  attempts hash              P:{Q}:attempts
    KEYS[b+6]  scores hash                P:{Q}:scores
    KEYS[b+7]  leaseinfo hash             P:{Q}:leaseinfo
    KEYS[b+8]  costs hash                 P:{Q}:costs
    KEYS[b+9]  limits hash                P:{Q}:limits

    ARGV[1] now_ms       explicit time in ms, or 0 for the server clock
    ARGV[2] lease_ms     lease length: the lease runs out at now + lease_ms...
    ARGV[3] timeout_ms   ...but never after its hard bound now + timeout_ms
    ARGV[4] max_retries  stored in the lease record (-1 = unlimited)
    ARGV[5] size         most tasks to take (1..10000, checked by the caller)
    ARGV[6] N            number of listed queues
    ARGV[7] holder       who holds the leases ('' = nobody named)
    ARGV[7+i]            the level of listed queue i

  Before choosing, each listed (queue, level) whose delayed tasks may be due
  (the limits hash says so: one HMGET per queue name) gets up to BQ_PROMOTE
  of them back to waiting at their original scores. Each taken task is
  admitted by its queue's limits (limits.lua), moves waiting -> leased, gets a
  lease record (counted in flight), and its attempts go up by 1.
  A queue that a limit stops gives nothing more in this call.

  Output:
    flat array: retry_ms, limited, then 4 items per taken task in the order
    they were chosen: queue_index (1-based position in the list), task_id,
    payload, attempts (counting this take).
    retry_ms: -1 when no limit held back waiting work, else the ms until the
    earliest rate or pause limit that did may let a task through (-1 when only
    max_in_flight did); limited: the reasons, comma-separated ('' = none).
]]
local BQ_STRIDE = 9
local BQ_PROMOTE = 100

local now = bq_now_ms(ARGV[1])
local deadline = bq_fmt(now + math.min(tonumber(ARGV[2]), tonumber(ARGV[3])))
local bound = bq_fmt(now + tonumber(ARGV[3]))
local retries = ARGV[4]
local size = tonumber(ARGV[5])
local nq = tonumber(ARGV[6])
local holder = ARGV[7]
local out = {-1, ''}
local taken = 0

-- limiter[q]: the limits of listed queue q; one object, and one read, per queue name
local limiter, limiters = {}, {}
do
  local groups, order = {}, {}
  for q = 1, nq do
    local key = KEYS[(q - 1) * BQ_STRIDE + 9]
    if not groups[key] then
      groups[key] = {first = q, members = {}, levels = {}}
      order[#order + 1] = groups[key]
    end
    local g = groups[key]
    g.members[#g.members + 1] = q
    g.levels[#g.levels + 1] = ARGV[7 + q]
  end
  for _, g in ipairs(order) do
    local k = (g.first - 1) * BQ_STRIDE + 9
    local lim = bq_limiter(k, k - 2, now, g.levels)
    limiters[#limiters + 1] = lim
    for j, q in ipairs(g.members) do
      limiter[q] = lim
      local due = lim.due[g.levels[j]]
      if due and due <= now then
        local b = (q - 1) * BQ_STRIDE
        bq_promote(b + 3, b + 1, b + 6, k, g.levels[j], now, BQ_PROMOTE)
      end
    end
  end
end

-- the tokens charged for task `id` of listed queue q, or nil when its limits stop it
local function bq_admit_task(q, id)
  local lim = limiter[q]
  if not lim.active then
    return 0
  end
  local cost = 0
  if lim.limited then
    cost = tonumber(redis.call('HGET', KEYS[(q - 1) * BQ_STRIDE + 8], id)) or 0
  end
  if not bq_admit(lim, cost) then
    return nil
  end
  bq_charge(lim, cost)
  return cost
end

-- lease task `id` of listed queue q (already removed from waiting)
local function bq_lease(q, id, charged)
  local b = (q - 1) * BQ_STRIDE
  redis.call('ZADD', KEYS[b + 2], deadline, id)
  local attempts = redis.call('HINCRBY', KEYS[b + 5], id, 1)
  redis.call('HSET', KEYS[b + 7], id, bq_lease_record(bound, retries, charged, holder))
  local payload = redis.call('HGET', KEYS[b + 4], id)
  out[#out + 1] = q
  out[#out + 1] = id
  out[#out + 1] = payload or ''
  out[#out + 1] = attempts
  taken = taken + 1
end

-- lease up to n tasks from the head of listed queue q, oldest first, while
-- its limits allow; returns how many it leased
local function bq_take_head(q, n)
  local b = (q - 1) * BQ_STRIDE
  if not limiter[q].active then
    local r = redis.call('ZPOPMIN', KEYS[b + 1], n)
    for i = 1, #r, 2 do
      bq_lease(q, r[i], 0)
    end
    return #r / 2
  end
  local got = 0
  while got < n do
    local ids = redis.call('ZRANGE', KEYS[b + 1], 0, n - got - 1)
    if #ids == 0 then
      return got
    end
    for _, id in ipairs(ids) do
      local cost = bq_admit_task(q, id)
      if cost == nil then
        return got
      end
      redis.call('ZREM', KEYS[b + 1], id)
      bq_lease(q, id, cost)
      got = got + 1
    end
  end
  return got
end

-- save the limiters and fill in retry_ms and limited
local function bq_take_result()
  local reasons, seen = {}, {}
  for _, lim in ipairs(limiters) do
    bq_save(lim)
    if lim.blocked then
      if not seen[lim.blocked] then
        seen[lim.blocked] = true
        reasons[#reasons + 1] = lim.blocked
      end
      if lim.wait and (out[1] == -1 or lim.wait < out[1]) then
        out[1] = lim.wait
      end
    end
  end
  out[2] = table.concat(reasons, ',')
  return out
end
