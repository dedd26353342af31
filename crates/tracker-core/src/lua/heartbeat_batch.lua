-- heartbeat_batch.lua: record heartbeats for many connections of one shard
-- (or, on a standalone Redis, of any shards): the batch endpoint's pairs, and
-- single heartbeats that arrived together (store/coalesce.rs).
--
-- KEYS     the connection set (c) of each pair's session, in pair order
--          (a session may appear more than once)
-- ARGV     clock offset ms, window ms, then one connection id per key
-- Returns  {now ms, i1, i2, ...}: the 1-based pair numbers that were unknown or dead.
-- Atomic   each pair's liveness check with its update: a heartbeat that lands
--          after the window or after the sweep never brings the connection
--          back. The sweep index keeps its older score: a lower bound is all
--          the sweep needs.
-- (Not a shard script: it needs none of common.lua.)

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local cutoff = now - tonumber(ARGV[2])
local unknown = { now }
for i = 1, #KEYS do
  local cid = ARGV[i + 2]
  local hb = redis.call('ZSCORE', KEYS[i], cid)
  if not hb or tonumber(hb) <= cutoff then
    unknown[#unknown + 1] = i
  else
    redis.call('ZADD', KEYS[i], now, cid)
  end
end
return unknown
