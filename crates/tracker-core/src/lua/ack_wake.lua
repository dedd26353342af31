-- ack_wake.lua: the resource is running again; the wake is no longer pending.
--
-- KEYS     the shard keys (common.lua), then the session's keys
-- ARGV     clock offset ms, window ms, session id, leader term, uid of the
--          resource read or patched, its generation ('' if unknown)
-- Returns  1 if a pending wake was acknowledged, 0 if none was pending, -1 if fenced.
-- Atomic   removal of the request with the state change, so each request
--          leads to one patch; a session woken with nobody connected is idle
--          from now, and a woken session starts a new running period (max
--          duration). A resource that is not the one mirrored (deleted and
--          created again) acknowledges nothing. The wake event armed before
--          the patch (arm_wake.lua, Kubernetes with NATS), if any, is queued
--          whatever the outcome but fenced, and once: the Session is running,
--          by that patch or by someone else's after the wake was asked for,
--          and whichever leader acknowledges it.

local window = tonumber(ARGV[2])
local S = session_at(1, ARGV[3])
local term, uid, gen = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local now = now_ms()
if fenced(term) then return -1 end
local m = load_meta(S)
emit_kept(S, m, 'wk', 'wake', now)
if m.uid and uid ~= '' and m.uid ~= uid then return 0 end
local before = snapshot(S, m)
local acked = redis.call('ZREM', K_WAKE, S.id)
if m.ph == 'w' then
  set_meta(S, m, 'ph', nil)
end
if m.res == '1' and m.ks ~= 'terminated' and (not gen or not m.gen or gen >= tonumber(m.gen)) then
  if m.ks ~= 'running' and before.n == 0 then set_meta(S, m, 'is', ms(now)) end
  if m.ks ~= 'running' then start_period(S, m, now) end
  set_meta(S, m, 'ks', 'running')
  if gen then set_meta(S, m, 'gen', ms(gen)) end
end
-- A newer generation says hibernated while someone is connected: wake again.
wake_if_in_use(S, m, now, window)
account(before, snapshot(S, m))
refresh_due(S, m, before.n)
return acked
