-- retire_ids.lua: the connections of these ids ended; their ids stay taken a while.
--
-- KEYS     per id, its bucket then its own entry (all of one id shard); last,
--          the set of the ids ended in this period
-- ARGV     clock offset ms (unused), when that set may expire (unix ms: the
--          period's end plus the id retention), then the ids in KEYS order,
--          then their 16 bytes in the same order
-- Returns  the number of ids moved into the set.
-- Atomic   each id's move from its entry (in its bucket, or its own key: a
--          claim whose registration was never marked, or an entry of an
--          older version) into the set: it is refused all along. Idempotent,
--          so a retried or doubled call is harmless: an id already moved is
--          found nowhere and left where it is.

local ended = KEYS[#KEYS]
local count = (#KEYS - 1) / 2
local n = 0
for k = 1, count do
  local bucket, own, id = KEYS[2 * k - 1], KEYS[2 * k], ARGV[2 + k]
  if redis.call('HDEL', bucket, id) + redis.call('DEL', own) > 0 then
    redis.call('SADD', ended, ARGV[2 + count + k])
    n = n + 1
  end
end
if n > 0 then redis.call('PEXPIREAT', ended, ARGV[2]) end
return n
