--[[
  Take the globally oldest waiting tasks (lowest score) across the listed
  queues, oldest first, up to size; ties go to the queue listed first. A
  queue whose limits stop its oldest task gives nothing more (no task jumps
  ahead of it).

  Cost: O(size * N) comparisons; heads are read in pages, never the whole set.

  Input (N listed queues, 9 keys each, b = 9*(i-1); details in take.lua):
    KEYS[b+1..b+9]  of queue i: waiting, leased, delayed (zsets P:{Q}:L:*),
                    tasks, attempts, scores, leaseinfo, costs, limits
                    (hashes P:{Q}:*)
    ARGV[1..7]      now_ms, lease_ms, timeout_ms, max_retries, size, N, holder
    ARGV[7+i]       the level of listed queue i

  Output (see take.lua):
    retry_ms, limited, then queue_index, task_id, payload, attempts per
    taken task
]]
-- @include common.lua
-- @include limits.lua
-- @include take.lua

local heads = {}   -- heads[q] = {id1, score1, id2, score2, ...} not yet taken
local pos = {}     -- index of the next id in heads[q]
local paged = {}   -- page size used for heads[q]

local function refill(q)
  local page = math.min(size - taken, 100)
  heads[q] = redis.call('ZRANGE', KEYS[(q - 1) * BQ_STRIDE + 1], 0, page - 1, 'WITHSCORES')
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
  local id = heads[best][pos[best]]
  local cost = bq_admit_task(best, id)
  if cost == nil then
    heads[best] = nil
  else
    redis.call('ZREM', KEYS[(best - 1) * BQ_STRIDE + 1], id)
    bq_lease(best, id, cost)
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
end
return bq_take_result()
