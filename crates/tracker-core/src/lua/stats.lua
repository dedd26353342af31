-- stats.lua: the maintained counters of one shard.
--
-- KEYS[1]  the shard's stats hash
-- ARGV     clock offset ms (unused)
-- Returns  flat pairs {counter, value, ...} (conns, sessions, shared,
--          proto:<protocol>, state:<state>); never scans the keyspace.
-- Atomic   a consistent snapshot of the shard's counters (read only).

return redis.call('HGETALL', KEYS[1])
