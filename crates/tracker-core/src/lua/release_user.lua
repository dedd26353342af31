-- release_user.lua: give back a user's connection slots.
--
-- KEYS[1]  user shard base "<prefix>:{u<n>}"
-- ARGV     clock offset ms, user id, max age ms ('' = any age), members...
-- Returns  the number of slots released.
-- Atomic   the age check with the removal, so a slot reserved again meanwhile
--          by a fresh registration is never released by a stale verification.

local key = B .. ':user:' .. ARGV[2]
local max_age = tonumber(ARGV[3])
local now = now_ms()
local released = 0
for i = 4, #ARGV do
  local score = redis.call('ZSCORE', key, ARGV[i])
  if score and (not max_age or tonumber(score) <= now - max_age) then
    released = released + redis.call('ZREM', key, ARGV[i])
  end
end
return released
