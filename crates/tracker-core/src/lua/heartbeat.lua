-- heartbeat.lua: record a heartbeat for one connection.
--
-- KEYS[1]  shard base of the session
-- ARGV     clock offset ms, window ms, session id, connection id
-- Returns  the new heartbeat time in ms, or false if the connection is unknown,
--          closed, swept, or already dead (its last heartbeat is a window old).
-- Atomic   the liveness check with the update: a heartbeat that lands after the
--          window or after the sweep never brings the connection back.

local window = tonumber(ARGV[2])
local sid, cid = ARGV[3], ARGV[4]
local now = now_ms()
local ckey = skey(sid, 'c')
local hb = redis.call('ZSCORE', ckey, cid)
if not hb or tonumber(hb) <= now - window then
  return false
end
-- The sweep index keeps its older score: a lower bound is all the sweep needs.
redis.call('ZADD', ckey, now, cid)
return now
