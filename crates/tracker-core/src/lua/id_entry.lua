-- id_entry.lua: a connection id's index entry, wherever it is kept.
--
-- KEYS[1]  the id's bucket
-- KEYS[2]  the id's own entry
-- ARGV     clock offset ms (unused), the connection id
-- Returns  the entry ("<state>|<session>|<user>") or nil.
-- Atomic   both reads: a registration marked in between (the entry moving
--          from its own key into the bucket) is never missed.

return redis.call('HGET', KEYS[1], ARGV[2]) or redis.call('GET', KEYS[2])
