-- rollback_hibernation.lua: the hibernation patch failed; release the claim.
--
-- KEYS[1]  shard base of the session
-- ARGV     clock offset ms, session id, retry delay ms
-- Returns  1 if a claim was released, else 0.
-- Atomic   the release with the retry time: the session is due again after the
--          delay, not at once, so a failing API server is not hammered. A wake
--          recorded meanwhile stays pending (waking a running Session is harmless).

local sid, delay = ARGV[2], tonumber(ARGV[3])
local now = now_ms()
local m = load_meta(sid)
local before = snapshot(sid, m)
local released = 0
if m.ph == 'h' then
  set_meta(sid, m, 'ph', nil)
  released = 1
end
set_meta(sid, m, 'hx', nil)
if released == 1 then
  set_meta(sid, m, 'nb', ms(now + delay))
end
account(before, snapshot(sid, m))
refresh_due(sid, m, before.n)
return released
