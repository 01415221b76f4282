--[[
  Take one task (the oldest) from each listed queue in turn, in the listed
  order, skipping queues that are empty or that their limits stop, until size
  tasks are taken or no queue gives any more.

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

local empty = {}
local left = nq
while taken < size and left > 0 do
  for q = 1, nq do
    if taken < size and not empty[q] and bq_take_head(q, 1) == 0 then
      empty[q] = true
      left = left - 1
    end
  end
end
return bq_take_result()
