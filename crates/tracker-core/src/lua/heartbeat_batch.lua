-- heartbeat_batch.lua: record heartbeats for many connections of one shard.
--
-- KEYS[1]  shard base
-- ARGV     clock offset ms, window ms, then pairs: session id, connection id, ...
-- Returns  {now ms, i1, i2, ...}: the 1-based pair numbers that were unknown or dead.
-- Atomic   each pair as in heartbeat.lua; the whole shard's batch in one round trip.

local window = tonumber(ARGV[2])
local now = now_ms()
local cutoff = now - window
local unknown = { now }
local pair = 0
for i = 3, #ARGV, 2 do
  pair = pair + 1
  local sid, cid = ARGV[i], ARGV[i + 1]
  local ckey = skey(sid, 'c')
  local hb = redis.call('ZSCORE', ckey, cid)
  if not hb or tonumber(hb) <= cutoff then
    unknown[#unknown + 1] = pair
  else
    redis.call('ZADD', ckey, now, cid)
  end
end
return unknown
