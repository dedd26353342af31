-- retire_ids.lua: the connections of these ids ended; their ids stay taken a while.
--
-- KEYS     per id, its bucket then its own entry (all of one id shard)
-- ARGV     clock offset ms (unused), how long an ended connection's id stays
--          refused (ms), then the ids, in KEYS order
-- Returns  the number of ids whose expiry was set.
-- Atomic   each id's move from its bucket to an entry of its own that
--          expires. Idempotent, so a retried or doubled call is harmless:
--          an id already moved (or registered by an older version, with an
--          entry of its own) only has its expiry set. Until this runs, the
--          id stays refused.

local ttl = ARGV[2]
local n = 0
for i = 1, #KEYS, 2 do
  local id = ARGV[2 + (i + 1) / 2]
  local v = redis.call('HGET', KEYS[i], id)
  if v then
    redis.call('SET', KEYS[i + 1], v, 'PX', ttl)
    redis.call('HDEL', KEYS[i], id)
    n = n + 1
  else
    n = n + redis.call('PEXPIRE', KEYS[i + 1], ttl)
  end
end
return n
