-- due_sessions.lua: sessions whose idle timeout (or lapsed claim) is reached.
--
-- KEYS[1]  the shard's due index
-- ARGV     clock offset ms, max sessions
-- Returns  session ids, most overdue first.
-- Atomic   nothing to make atomic (read only); O(due) thanks to the due index.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now),
  'LIMIT', 0, tonumber(ARGV[2]))
