-- outbox_ack.lua: drop archived entries from the outbox.
--
-- KEYS[1]  the shard's outbox stream
-- ARGV     clock offset ms (unused), entry ids...
-- Returns  {entries deleted, entries left in the outbox}
-- Atomic   the deletion with the backlog figure reported for metrics.

local ids = {}
for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
local deleted = 0
if #ids > 0 then deleted = redis.call('XDEL', KEYS[1], unpack(ids)) end
return { deleted, redis.call('XLEN', KEYS[1]) }
