-- mirror_session.lua: record what the Session resource says (the reaper's mirror).
--
-- KEYS[1]  shard base of the session
-- ARGV     clock offset ms, session id, owner ('' if none), spec.state,
--          idle timeout ms or 'off' (exempt, or empty spec.idleTimeout),
--          metadata.generation ('' if unknown)
-- Returns  1 if applied, 0 if the stored generation is newer (a stale event).
-- Atomic   the metadata with the idle bookkeeping and the hibernation index.
--          A state changed by someone else is followed, not fought: the mirror
--          never cancels a pending wake (only the wake's own patch does), and
--          it ends our claim once the resource shows the hibernation landed.

local sid, owner, ks, ito, gen = ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local now = now_ms()
local m = load_meta(sid)
if gen and m.gen and gen < tonumber(m.gen) then return 0 end
local before = snapshot(sid, m)
local was = m.res == '1' and m.ks or nil

set_meta(sid, m, 'res', '1')
set_meta(sid, m, 'own', owner ~= '' and owner or nil)
set_meta(sid, m, 'ks', ks)
set_meta(sid, m, 'ito', ito)
if gen then set_meta(sid, m, 'gen', ms(gen)) end
redis.call('SADD', K_KNOWN, sid)

if ks == 'running' and was ~= 'running' and before.n == 0 then
  -- First seen running, or woken by anyone: idle from now.
  set_meta(sid, m, 'is', ms(now))
elseif ks == 'running' and not m.is and before.n == 0 then
  set_meta(sid, m, 'is', ms(now))
end
if ks == 'hibernated' and m.ph == 'h' then
  set_meta(sid, m, 'ph', nil)
  set_meta(sid, m, 'hx', nil)
end
if ks == 'terminated' then
  set_meta(sid, m, 'ph', nil)
  set_meta(sid, m, 'hx', nil)
  redis.call('ZREM', K_WAKE, sid)
end
account(before, snapshot(sid, m))
refresh_due(sid, m, before.n)
keep_meta(sid, m, before.n)
return 1
