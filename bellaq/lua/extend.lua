--[[
  Renew the leases of many tasks of one (queue, level): each runs out at
  now + lease_ms, but never after the hard bound its take set, and never
  earlier than it already did.

  Input:
    KEYS[1] leased zset      P:{Q}:L:leased
    KEYS[2] leaseinfo hash   P:{Q}:leaseinfo

    ARGV[1] now_ms (0 = server clock)
    ARGV[2] lease_ms
    ARGV[3] holder: '' skips the check, else it must match each lease's holder
    ARGV[4..] task ids

  Output:
    { {task_id, deadline_ms, ...} of the renewed leases,
      {task ids not leased}, {task ids leased by another holder} }
    Only the renewed leases changed.
]]
-- @include common.lua

local now = bq_now_ms(ARGV[1])
local want = now + tonumber(ARGV[2])
local renewed, not_leased, wrong = {}, {}, {}
for i = 4, #ARGV do
  local id = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], id)
  if not score then
    not_leased[#not_leased + 1] = id
  else
    local rec = redis.call('HGET', KEYS[2], id)
    if not bq_holder_ok(rec, ARGV[3]) then
      wrong[#wrong + 1] = id
    else
      local deadline = tonumber(score)
      local bound = bq_parse_lease(rec) or deadline
      local new = math.max(deadline, math.min(want, bound))
      if new > deadline then
        redis.call('ZADD', KEYS[1], bq_fmt(new), id)
      end
      renewed[#renewed + 1] = id
      renewed[#renewed + 1] = bq_fmt(new)
    end
  end
end
return {renewed, not_leased, wrong}
