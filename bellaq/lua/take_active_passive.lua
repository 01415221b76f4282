--[[
  Drain the first listed queue (oldest first); only when it has nothing to
  give (empty, or stopped by its limits) take from the next, and so on, up to
  size.

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

for q = 1, nq do
  if taken >= size then
    break
  end
  bq_take_head(q, size - taken)
end
return bq_take_result()
