-- finish_hibernation.lua: the hibernation patch landed; record it.
--
-- KEYS     the shard keys (common.lua), then the session's keys
-- ARGV     clock offset ms, window ms, session id, leader term, uid of the
--          patched resource, its generation ('' if unknown)
-- Returns  'finished' when recorded and this term's claim ended; 'fenced' when
--          a newer leader wrote here; 'not_claimed' when recorded but the claim
--          is not this term's any more (lapsed and taken, rolled back, or ended
--          by a wake); 'stale' when nothing was recorded: the store knows
--          another resource or a newer generation (this term's claim, if any,
--          ends all the same).
-- Atomic   the end of the claim with the state change, which also ends the
--          running period (max duration). A wake recorded while
--          the patch was in flight stays pending, so it is not lost; a live
--          connection found now records one. The hibernate event the claim
--          carries (Kubernetes with NATS), if the mirror has not queued it
--          yet, is queued with the state whoever's claim it was (the patch
--          landed), but not when fenced or stale: the store knows a newer
--          state of the Session, whose own event may be queued already, and
--          a hibernate event after it would tell consumers the wrong end
--          state. Queued once: the claim's event is gone once queued, so a
--          call repeated after a lost answer queues nothing more.

local window = tonumber(ARGV[2])
local S = session_at(1, ARGV[3])
local term, uid, gen = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local now = now_ms()
if fenced(term) then return 'fenced' end
local m = load_meta(S)
if m.res ~= '1' or m.ks == 'terminated' or (m.uid and uid ~= '' and m.uid ~= uid) then
  return 'stale'
end
local before = snapshot(S, m)
-- Only this term's claim ends here. One rolled back, ended by a wake, or
-- lapsed and taken by another term is not ours: the outcome says so.
local outcome = 'not_claimed'
if m.ph == 'h' and m.ht == ms(term) then
  set_meta(S, m, 'ph', nil)
  set_meta(S, m, 'hx', nil)
  set_meta(S, m, 'ht', nil)
  set_meta(S, m, 'hr', nil)
  outcome = 'finished'
end
-- What the resource says is a fact whoever's claim it was, unless it is older
-- than what the store already knows.
if not gen or not m.gen or gen >= tonumber(m.gen) then
  set_meta(S, m, 'ks', 'hibernated')
  end_period(S, m)
  -- This claim was decided after any earlier released patch: that one is moot.
  set_meta(S, m, 'lp', nil)
  set_meta(S, m, 'lx', nil)
  if gen then set_meta(S, m, 'gen', ms(gen)) end
  announce_landing(S, m, now)
  wake_if_in_use(S, m, now, window)
else
  outcome = 'stale'
end
account(before, snapshot(S, m))
refresh_due(S, m, before.n)
return outcome
