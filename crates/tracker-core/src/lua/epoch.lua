-- epoch.lua: the shard's epoch marker, created if missing.
--
-- KEYS[1]  the shard's epoch marker
-- ARGV     clock offset ms (unused), a fresh random marker
-- Returns  {marker, 1 if it was created by this call else 0}
-- Atomic   read-or-create, so concurrent callers agree on one marker. A marker
--          that changes between two calls means the shard lost its data (a
--          restarted node without persistence, a flush).

local current = redis.call('GET', KEYS[1])
if current then return { current, 0 } end
redis.call('SET', KEYS[1], ARGV[2])
return { ARGV[2], 1 }
