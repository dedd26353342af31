-- heartbeat.lua: record a heartbeat for one connection.
--
-- KEYS[1]  the session's connection set (c)
-- ARGV     clock offset ms, window ms, connection id
-- Returns  the new heartbeat time in ms, or false if the connection is unknown,
--          closed, swept, or already dead (its last heartbeat is a window old).
-- Atomic   the liveness check with the update: a heartbeat that lands after the
--          window or after the sweep never brings the connection back.
-- (Not a shard script: the hot path declares and touches one key.)

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local hb = redis.call('ZSCORE', KEYS[1], ARGV[3])
if not hb or tonumber(hb) <= now - tonumber(ARGV[2]) then
  return false
end
-- The sweep index keeps its older score: a lower bound is all the sweep needs.
redis.call('ZADD', KEYS[1], now, ARGV[3])
return now
