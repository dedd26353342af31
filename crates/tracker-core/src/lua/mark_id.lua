-- mark_id.lua: record that a claimed connection id was registered.
--
-- KEYS[1]  the id's index entry
-- ARGV     clock offset ms (unused), session id, user id
-- Returns  1 if marked, 0 if the entry is gone or names another owner.
-- Atomic   the owner check with the change. The entry of a registered
--          connection does not expire while the connection lives (retire_ids
--          starts its expiry when the connection ends), so a long-lived
--          connection stays findable by id.

local claimed = 'c|' .. ARGV[2] .. '|' .. ARGV[3]
if redis.call('GET', KEYS[1]) ~= claimed then return 0 end
redis.call('SET', KEYS[1], 'r|' .. ARGV[2] .. '|' .. ARGV[3])
return 1
