-- finish_hibernation.lua: the hibernation patch landed; record it.
--
-- KEYS[1]  shard base of the session
-- ARGV     clock offset ms, session id, generation of the patched resource ('' if unknown)
-- Returns  1 if the session is now recorded hibernated, 0 if newer news won.
-- Atomic   the end of the claim with the state change. A wake recorded while
--          the patch was in flight stays pending, so it is not lost.

local sid, gen = ARGV[2], tonumber(ARGV[3])
local m = load_meta(sid)
local before = snapshot(sid, m)
if m.res ~= '1' or m.ks == 'terminated' then return 0 end
if m.ph == 'h' then
  set_meta(sid, m, 'ph', nil)
end
set_meta(sid, m, 'hx', nil)
local applied = 0
if not gen or not m.gen or gen >= tonumber(m.gen) then
  set_meta(sid, m, 'ks', 'hibernated')
  if gen then set_meta(sid, m, 'gen', ms(gen)) end
  applied = 1
end
account(before, snapshot(sid, m))
refresh_due(sid, m, before.n)
return applied
