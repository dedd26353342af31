-- epoch_due.lua: the shard's epoch marker and, if asked, its due sessions, in
-- one call: what the hibernator reads from every shard on every tick.
--
-- KEYS[1]  the shard's epoch marker
-- KEYS[2]  the shard's due index
-- ARGV     clock offset ms, a fresh random marker, max sessions (0: none wanted)
-- Returns  {marker, 1 if it was created by this call else 0, due session ids...},
--          the ids most overdue first
-- Atomic   the marker's read-or-create (see epoch.lua), and the due read in the
--          same step: ids read with a marker that was just created come from
--          an emptied shard, and the caller knows it.

local marker, created = redis.call('GET', KEYS[1]), 0
if not marker then
  marker, created = ARGV[2], 1
  redis.call('SET', KEYS[1], marker)
end
local out = { marker, created }
local max = tonumber(ARGV[3])
if max > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
  local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', string.format('%.0f', now), 'LIMIT', 0, max)
  for i = 1, #due do out[#out + 1] = due[i] end
end
return out
