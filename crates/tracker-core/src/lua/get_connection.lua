-- get_connection.lua: one connection by id, if it is live.
--
-- KEYS     the shard keys (common.lua), then the keys of the session the id
--          index names
-- ARGV     clock offset ms, window ms, session id, connection id
-- Returns  the 8 connection fields, or {} if absent, of another session, or dead.
-- Atomic   record and heartbeat read together (read only).

local window = tonumber(ARGV[2])
local S = session_at(1, ARGV[3])
local cid = ARGV[4]
local raw = redis.call('HGET', K_CONN, cid)
if not raw then return {} end
local rec = decode(raw)
if rec[1] ~= S.id then return {} end
local hb = redis.call('ZSCORE', S.c, cid)
if not hb or tonumber(hb) <= now_ms() - window then return {} end
return conn_fields(cid, rec, tonumber(hb))
