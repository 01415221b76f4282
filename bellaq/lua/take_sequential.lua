--[[
  At most one task of each listed queue at a time: a queue with any leased
  task (even one whose lease has run out but that requeue_expired has not
  reaped yet) or any delayed task gives nothing; any other queue gives at most
  one, its oldest, if its limits allow. Queues are visited in the listed order
  until size tasks are taken, so at most N tasks are returned. A delayed task
  that comes due returns at its original score, so it runs before the queue's
  later tasks.

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
  local b = (q - 1) * BQ_STRIDE
  if redis.call('ZCARD', KEYS[b + 2]) == 0 and redis.call('ZCARD', KEYS[b + 3]) == 0 then
    bq_take_head(q, 1)
  end
end
return bq_take_result()
