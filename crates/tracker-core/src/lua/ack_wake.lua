-- ack_wake.lua: the wake patch landed; the wake is no longer pending.
--
-- KEYS[1]  shard base of the session
-- ARGV     clock offset ms, session id, generation of the patched resource ('' if unknown)
-- Returns  1 if a pending wake was acknowledged, else 0.
-- Atomic   removal of the request with the state change, so each request
--          leads to one patch; a session woken with nobody connected is idle
--          from now.

local sid, gen = ARGV[2], tonumber(ARGV[3])
local now = now_ms()
local m = load_meta(sid)
local before = snapshot(sid, m)
local acked = redis.call('ZREM', K_WAKE, sid)
if m.ph == 'w' then
  set_meta(sid, m, 'ph', nil)
end
if m.res == '1' and m.ks ~= 'terminated' and (not gen or not m.gen or gen >= tonumber(m.gen)) then
  if m.ks ~= 'running' and before.n == 0 then set_meta(sid, m, 'is', ms(now)) end
  set_meta(sid, m, 'ks', 'running')
  if gen then set_meta(sid, m, 'gen', ms(gen)) end
end
account(before, snapshot(sid, m))
refresh_due(sid, m, before.n)
return acked
