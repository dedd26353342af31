-- close.lua: close a connection and queue its history record.
--
-- KEYS[1]  shard base of the session
-- ARGV     clock offset ms, window ms, session id, connection id
-- Returns  {'closed', user id} when a live connection was closed;
--          {'expired', user id} when it was already dead (archived as expired);
--          {} when the session has no such connection.
-- Atomic   removal, counters, session idle bookkeeping and the outbox record.

local window = tonumber(ARGV[2])
local sid, cid = ARGV[3], ARGV[4]
local now = now_ms()
local raw = redis.call('HGET', K_CONN, cid)
if not raw then return {} end
local rec = decode(raw)
if rec[1] ~= sid then return {} end
local hb = tonumber(redis.call('ZSCORE', skey(sid, 'c'), cid) or rec[6])

local m = load_meta(sid)
local before = snapshot(sid, m)
local reason, ended = 'closed', now
if hb <= now - window then
  -- It died before the close arrived; history says so.
  reason, ended = 'expired', hb + window
end
finish_conn(sid, cid, rec, hb, ended, reason)
local after = snapshot(sid, m)
note_ended(sid, m, after.n, rec[6], ended)
account(before, after)
refresh_due(sid, m, after.n)
keep_meta(sid, m, after.n)
return { reason, rec[2] }
