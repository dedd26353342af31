-- pending_wakes.lua: sessions with a pending wake, oldest request first.
--
-- KEYS[1]  shard base
-- ARGV     clock offset ms, max sessions
-- Returns  flat pairs {session id, requested at ms, ...}
-- Atomic   nothing to make atomic (read only).

return redis.call('ZRANGE', K_WAKE, 0, tonumber(ARGV[2]) - 1, 'WITHSCORES')
