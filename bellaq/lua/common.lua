--[[
  Shared helpers, not a script of its own.

  Scripts pull this file in by textual inclusion: QueueEngine replaces a line
  `-- @include common.lua` with this file's contents when it loads the scripts,
  so the SHA that Redis sees is that of the expanded text.

  Conventions of every script:
    - the five per-task hashes of a queue are passed as consecutive KEYS in
      this order: tasks, attempts, scores, leaseinfo, costs ("task hashes at t"
      means KEYS[t] .. KEYS[t + 4]);
    - a lease record (leaseinfo hash) is "<bound_ms> <max_retries> <charged>
      <holder>": the hard bound of the lease, the retries allowed when it runs
      out, the tokens the take charged, and who holds it ('' = nobody named).

  bq_now_ms(arg)       -> the explicit time `arg` in ms when it is a number > 0,
                          else the server clock (TIME; fine with effect
                          replication, the default since Redis 5).
  bq_fmt(n)            -> n as an integer string (no exponent, no precision loss).
  bq_forget(t, ids)    -> HDEL `ids` from the task hashes at t (the task leaves
                          the engine).
  bq_lease_record(bound, retries, charged, holder) -> a lease record.
  bq_parse_lease(rec)  -> bound, retries, charged, holder of a record (all nil
                          when rec is nil).
  bq_holder_ok(rec, holder)
                       -> false only when `holder` is given (not ''), the lease
                          names a holder, and the two differ.
  bq_requeue(w, s, id, now)
                       -> ZADD `id` to waiting KEYS[w] at its original enqueue
                          score from the scores hash KEYS[s] (now, if unknown).
  bq_promote(d, w, s, k, level, now, limit)
                       -> move up to `limit` due tasks (due time <= now) from the
                          delayed zset KEYS[d] back to waiting; returns their ids.
                          Keeps the field due:<level> of the limits hash KEYS[k]
                          (see limits.lua): the earliest due time left, if any.
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

local function bq_forget(t, ids)
  -- in chunks: unpack() of thousands of values would overflow the Lua stack
  for i = 1, #ids, 500 do
    local j = math.min(i + 499, #ids)
    for k = t, t + 4 do
      redis.call('HDEL', KEYS[k], unpack(ids, i, j))
    end
  end
end

local function bq_lease_record(bound, retries, charged, holder)
  return bound .. ' ' .. retries .. ' ' .. bq_fmt(charged) .. ' ' .. holder
end

local function bq_parse_lease(rec)
  if not rec then
    return nil, nil, nil, nil
  end
  local b, r, c, h = string.match(rec, '^(%S+) (%S+) (%S+) (.*)$')
  return tonumber(b), tonumber(r), tonumber(c), h
end

local function bq_holder_ok(rec, holder)
  if holder == '' then
    return true
  end
  local _, _, _, h = bq_parse_lease(rec)
  return h == nil or h == '' or h == holder
end

local function bq_requeue(w, s, id, now)
  local score = redis.call('HGET', KEYS[s], id)
  if not score then
    score = bq_fmt(now * 1000)
    redis.call('HSET', KEYS[s], id, score)
  end
  redis.call('ZADD', KEYS[w], score, id)
end

local function bq_promote(d, w, s, k, level, now, limit)
  local due = redis.call('ZRANGEBYSCORE', KEYS[d], '-inf', bq_fmt(now), 'LIMIT', 0, limit)
  for _, id in ipairs(due) do
    redis.call('ZREM', KEYS[d], id)
    bq_requeue(w, s, id, now)
  end
  -- written only when it changes: the reaper calls this for every level every few seconds
  local field = 'due:' .. level
  local head = redis.call('ZRANGE', KEYS[d], 0, 0, 'WITHSCORES')
  local have = redis.call('HGET', KEYS[k], field)
  if #head == 0 then
    if have then
      redis.call('HDEL', KEYS[k], field)
    end
  elseif have ~= head[2] then
    redis.call('HSET', KEYS[k], field, head[2])
  end
  return due
end
