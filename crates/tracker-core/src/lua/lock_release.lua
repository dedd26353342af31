-- lock_release.lua: give up a leader lock on shutdown.
--
-- KEYS[1]  the lock key
-- ARGV     clock offset ms (unused), holder token
-- Returns  1 if released, 0 if the caller did not hold it.
-- Atomic   the holder check with the deletion: a lock taken over by another
--          holder after ours lapsed is never released by us.
-- (Not a shard script: it does not use common.lua.)

if redis.call('GET', KEYS[1]) == ARGV[2] then
  return redis.call('DEL', KEYS[1])
end
return 0
