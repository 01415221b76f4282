--[[
  Put a leased task aside until a due time (the upstream asked to retry
  later): its lease and in-flight slot are freed at once, its payload,
  attempts and original enqueue score are kept. Takes and the reaper move it
  back to waiting at its original score once it is due.

  Input:
    KEYS[1] leased zset      P:{Q}:L:leased
    KEYS[2] delayed zset     P:{Q}:L:delayed
    KEYS[3] leaseinfo hash   P:{Q}:leaseinfo
    KEYS[4] limits hash      P:{Q}:limits (token correction, due:<level>)

    ARGV[1] task_id
    ARGV[2] delay_ms: due at now + delay_ms
    ARGV[3] holder: '' skips the check, else it must match the lease's holder
    ARGV[4] tokens the attempt really used ('' = unknown), as in complete.lua
    ARGV[5] now_ms (0 = server clock)
    ARGV[6] the level L

  Output:
    'delayed'      done
    'wrong_holder' leased by another holder: nothing changed
    'not_leased'   not leased (nothing changed)
]]
-- @include common.lua
-- @include limits.lua

local id = ARGV[1]
if not redis.call('ZSCORE', KEYS[1], id) then
  return 'not_leased'
end
local rec = redis.call('HGET', KEYS[3], id)
if not bq_holder_ok(rec, ARGV[3]) then
  return 'wrong_holder'
end
local now = bq_now_ms(ARGV[5])
if ARGV[4] ~= '' then
  local lim = bq_limiter(4, 3, now)
  local _, _, charged = bq_parse_lease(rec)
  bq_correct(lim, charged or 0, tonumber(ARGV[4]))
  bq_save(lim)
end
redis.call('ZREM', KEYS[1], id)
redis.call('HDEL', KEYS[3], id)
local due = now + tonumber(ARGV[2])
redis.call('ZADD', KEYS[2], bq_fmt(due), id)
-- keep due:<level> a lower bound of the level's due times (see limits.lua)
local field = 'due:' .. ARGV[6]
local earliest = tonumber(redis.call('HGET', KEYS[4], field))
if not earliest or due < earliest then
  redis.call('HSET', KEYS[4], field, bq_fmt(due))
end
return 'delayed'
