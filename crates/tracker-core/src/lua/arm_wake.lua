-- arm_wake.lua: a wake patch is about to be sent (Kubernetes with NATS):
-- record the wake event it announces once the wake is seen done. The waker
-- has just read the Session hibernated: a claim's hibernation the store has
-- not recorded yet has landed, and is announced now, before the wake (its own
-- record would come after the wake's and be refused as superseded).
--
-- KEYS     the shard keys (common.lua), then the session's keys
-- ARGV     clock offset ms, window ms, session id, leader term, event id,
--          platform, reason
-- Returns  1 if recorded; 0 if no wake is pending (nothing to patch for);
--          -1 if fenced (a newer leader wrote here).
-- Atomic   the event with the pending wake it belongs to, before the patch:
--          whoever acknowledges the wake queues it (ack_wake.lua), this
--          leader or, after a leader change between the patch and its
--          record, the next one, which finds the Session running and knows
--          nothing of the patch. Each arming replaces the last: one wake, one
--          event, whichever attempt landed.

local S = session_at(1, ARGV[3])
local term = tonumber(ARGV[4])
if fenced(term) then return -1 end
local m = load_meta(S)
if m.ph ~= 'w' then return 0 end
announce_landing(S, m, now_ms())
set_meta(S, m, 'wk', kept_event(ARGV[5], ARGV[6], ARGV[7]))
return 1
