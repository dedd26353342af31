-- sweep_candidates.lua: sessions of one shard that may hold a dead connection.
--
-- KEYS[1]  the shard's live index
-- ARGV     clock offset ms, window ms, max sessions
-- Returns  session ids whose oldest heartbeat may be a window old, oldest first.
-- Atomic   nothing to make atomic (read only). The sweep itself (sweep.lua)
--          checks every candidate again, so a candidate that heartbeat since
--          is only re-scored.
-- (Not a shard script: the sweep's first step reads one key.)

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local cutoff = now - tonumber(ARGV[2])
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', cutoff),
  'LIMIT', 0, tonumber(ARGV[3]))
