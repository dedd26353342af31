-- release_user.lua: give back connection slots of users of one user shard.
--
-- KEYS     the users' slot sets
-- ARGV     clock offset ms, max age ms ('' = any age), then pairs:
--          index into KEYS (1-based), member "<session id>/<connection id>"
-- Returns  the number of slots released.
-- Atomic   the age check with the removal, so a slot reserved again meanwhile
--          by a fresh registration is never released by a stale verification.
--          Idempotent: the API releases on close and the archiver again after
--          the history commit, so a crash between an end and its release
--          leaks nothing.
-- (Not a shard script: it does not use common.lua.)

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local max_age = tonumber(ARGV[2])
local released = 0
for i = 3, #ARGV, 2 do
  local key, member = KEYS[tonumber(ARGV[i])], ARGV[i + 1]
  local score = redis.call('ZSCORE', key, member)
  if score and (not max_age or tonumber(score) <= now - max_age) then
    released = released + redis.call('ZREM', key, member)
  end
end
return released
