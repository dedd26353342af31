-- rollback_hibernation.lua: the hibernation patch did not land; release the claim.
--
-- KEYS     the shard keys (common.lua), then the session's keys
-- ARGV     clock offset ms, window ms, session id, leader term, retry delay ms,
--          how long the patch may still land ms ('' if it surely did not:
--          refused, or never sent)
-- Returns  1 if this term's claim was released; 0 if the claim is not this
--          term's (lapsed and taken, or already ended by a wake); -1 if fenced.
-- Atomic   the release with the retry time: the session is due again after the
--          delay, not at once, so a failing API server is not hammered. Only
--          the claim's own term releases it: a stalled leader's late rollback
--          never clears a newer leader's claim. A wake recorded meanwhile stays
--          pending (waking a running Session is harmless). A patch whose
--          answer was lost may land after the release: the time it may land
--          until is recorded (even when the claim was no longer ours), so a
--          connection made meanwhile wakes the session if it does
--          (follow_state in common.lua).

local S = session_at(1, ARGV[3])
local term, delay, may_land = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local now = now_ms()
if fenced(term) then return -1 end
local m = load_meta(S)
if may_land and m.res == '1' then
  -- Whoever holds the claim now (a wake may have ended ours, and the waker
  -- found the Session still running), our patch is still out there.
  -- Connections made before now asked for their wake while the claim was
  -- on; the ones made from now on are those the landing would strand.
  set_meta(S, m, 'lp', ms(now))
  set_meta(S, m, 'lx', ms(now + may_land))
end
if m.ph ~= 'h' or m.ht ~= ms(term) then return 0 end
local before = snapshot(S, m)
set_meta(S, m, 'ph', nil)
set_meta(S, m, 'hx', nil)
set_meta(S, m, 'ht', nil)
set_meta(S, m, 'hr', nil)
set_meta(S, m, 'nb', ms(now + delay))
-- A patch that may still land keeps its event for the landing (follow_state).
if not may_land then set_meta(S, m, 'hn', nil) end
account(before, snapshot(S, m))
refresh_due(S, m, before.n)
return 1
