-- close.lua: close a connection and queue its history record.
--
-- KEYS     the shard keys (common.lua), then the session's keys
-- ARGV     clock offset ms, window ms, session id, connection id
-- Returns  {'closed', user id} when a live connection was closed;
--          {'expired', user id} when it was already dead (archived as expired);
--          {} when the session has no such connection.
-- Atomic   removal, counters, session idle bookkeeping and the outbox record.

local window = tonumber(ARGV[2])
local S = session_at(1, ARGV[3])
local cid = ARGV[4]
local now = now_ms()
local raw = redis.call('HGET', K_CONN, cid)
if not raw then return {} end
local rec = decode(raw)
if rec[1] ~= S.id then return {} end
local hb = tonumber(redis.call('ZSCORE', S.c, cid) or rec[6])

local m = load_meta(S)
local before = snapshot(S, m)
local reason, ended = 'closed', now
if hb <= now - window then
  -- It died before the close arrived; history says so.
  reason, ended = 'expired', hb + window
end
finish_conn(S, m, cid, rec, hb, ended, reason)
local after = snapshot(S, m)
note_ended(S, m, after.n, rec[6], ended)
account(before, after)
refresh_due(S, m, after.n)
keep_meta(S, m, after.n)
return { reason, rec[2] }
