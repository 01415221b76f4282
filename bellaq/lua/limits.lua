--[[
  Per-queue limits, shared by every level of a queue and consumed inside the
  scripts that lease (not a script of its own; included after common.lua).

  The limits hash P:{Q}:limits holds
    rpm, tpm, max_in_flight, burst_ms    the configuration (set_limits.lua)
    paused_until                         nothing is leased before this (ms)
    req, req_ts / tok, tok_ts            the request and token buckets: level
                                         at time *_ts (ms)
    factor, factor_ts                    AIMD factor on both rates at factor_ts
    win_start, win_req, win_tok          requests and tokens charged in the
                                         one-minute window from win_start (stats)
    due:<level>                          no delayed task of that level is due
                                         before this (ms): a lower bound kept by
                                         delay.lua and bq_promote, so a take
                                         reads it here instead of probing each
                                         delayed set

  A bucket holds burst_ms worth of its per-minute rate (at least 1) and refills
  continuously at rate * factor. A task needs one request token and
  min(cost, capacity) tokens, and is charged its full cost: a task costing more
  than the bucket holds waits for a full bucket and leaves it in debt, so the
  long-run rate holds and big tasks never starve. In flight are the entries of
  the queue's leaseinfo hash: one per leased task, every level. The factor (<= 1) halves on a
  throttle signal (pause.lua) and regains BQ_AI_PER_MS of the rate per ms.

  bq_limiter(k, f, now, levels)
                        -> the limits of KEYS[k] (leaseinfo hash KEYS[f]) at now:
                           .active (anything to check), .limited (a limit set),
                           .due[level] for each of `levels` (nil: none delayed)
  bq_admit(lim, cost)   -> true, or false after noting lim.blocked (the
                           reason: 'paused', 'in_flight', 'rpm', 'tpm') and
                           lim.wait (ms until it may pass; nil for in_flight).
                           Once blocked, a limiter admits nothing more in this
                           call, so a level behind cannot take what an earlier
                           level waits for.
  bq_charge(lim, cost)  -> consume one request and `cost` tokens.
  bq_correct(lim, charged, actual) -> give back (or take) the difference.
  bq_save(lim)          -> write the state back if it changed.
]]
local BQ_WINDOW_MS = 60000
local BQ_BURST_MS = 1000
local BQ_AI_PER_MS = 0.01 / 1000
local BQ_MD = 0.5
local BQ_MIN_FACTOR = 0.0625
local BQ_EPS = 1e-6  -- float noise: a level this close to what is needed counts as enough

local function bq_bucket(limit, burst, level, ts, factor, now)
  local cap = math.max(1, limit * burst / BQ_WINDOW_MS)
  local t = tonumber(ts) or now
  local l = tonumber(level) or cap
  l = math.min(cap, l + math.max(0, now - t) * limit * factor / BQ_WINDOW_MS)
  return {cap = cap, rate = limit * factor / BQ_WINDOW_MS, level = l, ts = math.max(t, now)}
end

local function bq_limiter(k, f, now, levels)
  levels = levels or {}
  local fields = {'rpm', 'tpm', 'max_in_flight', 'paused_until'}
  for _, level in ipairs(levels) do
    fields[#fields + 1] = 'due:' .. level
  end
  local v = redis.call('HMGET', KEYS[k], unpack(fields))
  local lim = {k = k, now = now, paused = tonumber(v[4]) or 0, due = {}}
  for i, level in ipairs(levels) do
    lim.due[level] = tonumber(v[4 + i])
  end
  lim.rpm, lim.tpm, lim.mif = tonumber(v[1]), tonumber(v[2]), tonumber(v[3])
  lim.limited = (lim.rpm or lim.tpm or lim.mif) ~= nil
  lim.active = lim.limited or lim.paused > now
  if not lim.limited then
    return lim
  end
  -- the state is read only for a queue with limits: queues without pay one HMGET
  v = redis.call('HMGET', KEYS[k], 'burst_ms', 'req', 'req_ts', 'tok', 'tok_ts', 'factor', 'factor_ts',
    'win_start', 'win_req', 'win_tok')
  lim.burst = tonumber(v[1]) or BQ_BURST_MS
  local since = math.max(0, now - (tonumber(v[7]) or now))
  lim.factor = math.min(1, (tonumber(v[6]) or 1) + since * BQ_AI_PER_MS)
  if lim.rpm then
    lim.req = bq_bucket(lim.rpm, lim.burst, v[2], v[3], lim.factor, now)
  end
  if lim.tpm then
    lim.tok = bq_bucket(lim.tpm, lim.burst, v[4], v[5], lim.factor, now)
  end
  if lim.mif then
    lim.inflight = redis.call('HLEN', KEYS[f])
  end
  local ws = tonumber(v[8])
  if ws == nil or now >= ws + BQ_WINDOW_MS then
    lim.win = {now, 0, 0}
  else
    lim.win = {ws, tonumber(v[9]) or 0, tonumber(v[10]) or 0}
  end
  return lim
end

local function bq_block(lim, reason, wait)
  lim.blocked = reason
  lim.wait = wait
  return false
end

local function bq_bucket_wait(b, need)
  return math.max(1, math.ceil((need - b.level) / b.rate - BQ_EPS))
end

local function bq_admit(lim, cost)
  if lim.blocked then
    return false
  end
  if lim.paused > lim.now then
    return bq_block(lim, 'paused', lim.paused - lim.now)
  end
  if not lim.limited then
    return true
  end
  if lim.mif and lim.inflight >= lim.mif then
    return bq_block(lim, 'in_flight', nil)
  end
  if lim.req and lim.req.level < 1 - BQ_EPS then
    return bq_block(lim, 'rpm', bq_bucket_wait(lim.req, 1))
  end
  if lim.tok then
    local need = math.min(cost, lim.tok.cap)
    if lim.tok.level < need - BQ_EPS then
      return bq_block(lim, 'tpm', bq_bucket_wait(lim.tok, need))
    end
  end
  return true
end

local function bq_charge(lim, cost)
  if not lim.limited then
    return
  end
  if lim.req then
    lim.req.level = lim.req.level - 1
  end
  if lim.tok then
    lim.tok.level = lim.tok.level - cost
  end
  if lim.mif then
    lim.inflight = lim.inflight + 1
  end
  lim.win[2] = lim.win[2] + 1
  lim.win[3] = lim.win[3] + cost
  lim.dirty = true
end

local function bq_correct(lim, charged, actual)
  if not lim.limited then
    return
  end
  local diff = actual - charged
  if lim.tok then
    lim.tok.level = math.min(lim.tok.cap, lim.tok.level - diff)
  end
  lim.win[3] = math.max(0, lim.win[3] + diff)
  lim.dirty = true
end

local function bq_save(lim)
  if not lim.dirty then
    return
  end
  local f = {'win_start', bq_fmt(lim.win[1]), 'win_req', bq_fmt(lim.win[2]), 'win_tok', bq_fmt(lim.win[3]),
             'factor', string.format('%.17g', lim.factor), 'factor_ts', bq_fmt(lim.now)}
  for _, b in ipairs({{'req', lim.req}, {'tok', lim.tok}}) do
    if b[2] then
      f[#f + 1] = b[1]
      f[#f + 1] = string.format('%.17g', b[2].level)
      f[#f + 1] = b[1] .. '_ts'
      f[#f + 1] = bq_fmt(b[2].ts)
    end
  end
  redis.call('HSET', KEYS[lim.k], unpack(f))
end
