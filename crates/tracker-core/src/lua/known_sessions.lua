-- known_sessions.lua: the session ids of this shard mirrored from resources.
--
-- KEYS[1]  shard base
-- ARGV     clock offset ms (unused)
-- Returns  session ids (the mirror forgets those no longer listed after a resync).
-- Atomic   nothing to make atomic (read only).

return redis.call('SMEMBERS', K_KNOWN)
