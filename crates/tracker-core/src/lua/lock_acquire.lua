-- lock_acquire.lua: take or renew a leader lock (TRACKER_ELECTION=redis).
--
-- KEYS[1]  the lock key
-- ARGV     clock offset ms (unused), holder token, lease ms
-- Returns  1 if the caller holds the lock for another lease, 0 if someone else does.
-- Atomic   the holder check with the renewal: only the holder extends its lease,
--          and a free lock is taken by exactly one caller.
-- (Not a shard script: it does not use common.lua.)

local holder = redis.call('GET', KEYS[1])
if holder == ARGV[2] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
