-- mark_id.lua: record that a claimed connection id was registered.
--
-- KEYS[1]  the id's bucket
-- KEYS[2]  the id's own entry (the claim)
-- ARGV     clock offset ms (unused), session id, user id, the connection id
-- Returns  1 if marked (or marked before), 0 if the claim is gone or names
--          another owner.
-- Atomic   the owner check with the move: the claim's key goes and the
--          registered entry becomes a field of the bucket, where it costs a
--          fraction of a key and has no expiry while the connection lives
--          (retire_ids moves it back to a key of its own, with an expiry,
--          when the connection ends), so a long-lived connection stays
--          findable by id.

local id = ARGV[4]
-- The session alone: whoever replays, the registering script compares the
-- user with the connection's own record, and a short entry keeps the bucket
-- within `hash-max-listpack-value` (64 bytes), compact.
local registered = 'r|' .. ARGV[2]
if redis.call('HGET', KEYS[1], id) == registered then return 1 end
if redis.call('GET', KEYS[2]) ~= 'c|' .. ARGV[2] .. '|' .. ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], id, registered)
redis.call('DEL', KEYS[2])
return 1
