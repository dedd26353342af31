-- due_sessions.lua: sessions whose idle timeout (or lapsed claim) is reached.
--
-- KEYS[1]  shard base
-- ARGV     clock offset ms, max sessions
-- Returns  session ids, most overdue first.
-- Atomic   nothing to make atomic (read only); O(due) thanks to the due index.

return redis.call('ZRANGEBYSCORE', K_DUE, '-inf', ms(now_ms()), 'LIMIT', 0, tonumber(ARGV[2]))
