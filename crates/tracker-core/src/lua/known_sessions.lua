-- known_sessions.lua: the session ids of this shard mirrored from resources.
--
-- KEYS[1]  the shard's known set
-- ARGV     clock offset ms (unused)
-- Returns  session ids (the mirror forgets those no longer listed after a resync).
-- Atomic   nothing to make atomic (read only).

return redis.call('SMEMBERS', KEYS[1])
