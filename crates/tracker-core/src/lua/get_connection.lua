-- get_connection.lua: one connection by id, if it is live in this shard.
--
-- KEYS[1]  shard base
-- ARGV     clock offset ms, window ms, connection id
-- Returns  the 8 connection fields, or {} if absent or dead.
-- Atomic   record and heartbeat read together (read only).

local window = tonumber(ARGV[2])
local cid = ARGV[3]
local raw = redis.call('HGET', K_CONN, cid)
if not raw then return {} end
local rec = decode(raw)
local hb = redis.call('ZSCORE', skey(rec[1], 'c'), cid)
if not hb or tonumber(hb) <= now_ms() - window then return {} end
return conn_fields(cid, rec, tonumber(hb))
