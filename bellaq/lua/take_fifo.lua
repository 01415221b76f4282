--[[
  Take the globally oldest waiting tasks (lowest score) across the listed
  queues, oldest first, up to size; ties go to the queue listed first.
  Each taken task moves waiting -> leased (deadline now + timeout), its
  attempts go up by 1 and its max retries are recorded.

  Cost: O(size * N) comparisons; heads are read in pages, never the whole set.

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

local heads = {}   -- heads[q] = {id1, score1, id2, score2, ...} not yet taken
local pos = {}     -- index of the next id in heads[q]
local paged = {}   -- page size used for heads[q]

local function refill(q)
  local page = math.min(size - taken, 100)
  heads[q] = redis.call('ZRANGE', KEYS[(q - 1) * 5 + 1], 0, page - 1, 'WITHSCORES')
  pos[q] = 1
  paged[q] = page
  if #heads[q] == 0 then
    heads[q] = nil
  end
end

for q = 1, nq do
  refill(q)
end

while taken < size do
  local best, best_score = nil, nil
  for q = 1, nq do
    local h = heads[q]
    if h then
      local s = tonumber(h[pos[q] + 1])
      if best == nil or s < best_score then
        best = q
        best_score = s
      end
    end
  end
  if best == nil then
    break
  end
  local base = (best - 1) * 5 + 1
  local id = heads[best][pos[best]]
  redis.call('ZREM', KEYS[base], id)
  bq_lease(base, best, id, deadline, retries, out)
  taken = taken + 1
  pos[best] = pos[best] + 2
  if pos[best] > #heads[best] then
    -- page used up: a full page means the queue may hold more
    if #heads[best] == 2 * paged[best] and taken < size then
      refill(best)
    else
      heads[best] = nil
    end
  end
end
return out
