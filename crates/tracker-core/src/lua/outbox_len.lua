-- outbox_len.lua: how many finished connections await the archiver.
--
-- KEYS[1]  the shard's outbox stream
-- ARGV     clock offset ms (unused)
-- Returns  the outbox length.
-- Atomic   nothing to make atomic (read only).

return redis.call('XLEN', KEYS[1])
