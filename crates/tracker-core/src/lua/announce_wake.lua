-- announce_wake.lua: a pending wake goes to NATS (the docker platform).
--
-- KEYS     the shard keys (common.lua), then the session's keys
-- ARGV     clock offset ms, window ms, session id, leader term, event id,
--          platform, reason
-- Returns  1 if the wake event was queued; 2 if no event is needed (the
--          session is running and no hibernation is being announced: the wake
--          is acknowledged here); 0 if nothing was pending, it was announced
--          already, or the session is terminated or unknown (the wake is
--          dropped); -1 if fenced.
-- Atomic   the queueing of the event with leaving the wake index: the wake
--          stays pending (phase 'w', field we) until NATS acknowledges the
--          event (event_ack.lua), but is announced once, so each wake request
--          leads to one event however often the waker reads it. A hibernate
--          event still waiting in the outbox is older in the stream, so the
--          controller receives it before this wake.

local S = session_at(1, ARGV[3])
local term, eid, platform, reason = tonumber(ARGV[4]), ARGV[5], ARGV[6], ARGV[7]
local now = now_ms()
if fenced(term) then return -1 end
local m = load_meta(S)
if m.ph ~= 'w' or m.we then
  redis.call('ZREM', K_WAKE, S.id)
  return 0
end
local before = snapshot(S, m)
local outcome = 0
if m.res ~= '1' or m.ks == 'terminated' then
  set_meta(S, m, 'ph', nil)
elseif m.ks == 'running' and not m.he then
  set_meta(S, m, 'ph', nil)
  outcome = 2
else
  set_meta(S, m, 'we', eid)
  emit_event(S, m, eid, 'wake', platform, reason, now, true)
  outcome = 1
end
redis.call('ZREM', K_WAKE, S.id)
account(before, snapshot(S, m))
refresh_due(S, m, before.n)
return outcome
