-- retire_ids.lua: the connections of these ids ended; their ids stay taken a while.
--
-- KEYS     index entries of ended connections (one id shard)
-- ARGV     clock offset ms (unused), how long an ended connection's id stays refused, ms
-- Returns  the number of entries whose expiry was set.
-- Atomic   nothing to make atomic; idempotent, so a retried or doubled call is
--          harmless. Until it runs, the entry keeps refusing the id.

local n = 0
for i = 1, #KEYS do
  n = n + redis.call('PEXPIRE', KEYS[i], ARGV[2])
end
return n
