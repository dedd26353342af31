-- pending_wakes.lua: sessions with a pending wake, oldest request first.
--
-- KEYS[1]  the shard's wake index
-- ARGV     clock offset ms (unused), max sessions
-- Returns  flat pairs {session id, requested at ms, ...}
-- Atomic   nothing to make atomic (read only).

return redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1, 'WITHSCORES')
