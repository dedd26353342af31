-- outbox_read.lua: the oldest finished connections awaiting the archiver.
--
-- KEYS[1]  the shard's outbox stream
-- ARGV     clock offset ms (unused), max entries
-- Returns  stream entries {{id, {field, value, ...}}, ...}
-- Atomic   nothing to make atomic (read only). The outbox holds exactly what is
--          not yet archived: entries leave it only by outbox_ack after the
--          PostgreSQL commit.

return redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', tonumber(ARGV[2]))
