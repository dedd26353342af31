-- claim_hibernation.lua: compare-and-set a session from idle to hibernating.
--
-- KEYS[1]  shard base of the session
-- ARGV     clock offset ms, session id, claim lifetime ms
-- Returns  {'claimed', generation ('' if none)} or {'refused', reason}, reason one of
--          'not_mirrored', 'not_running', 'busy' (in another phase), 'connected',
--          'exempt', 'not_due'.
-- Atomic   the check that the session is mirrored, running, not exempt, without
--          any connection and past its idle timeout, with the move to
--          hibernating: a registration either lands first (claim refused) or
--          after (it sees 'hibernating' and records a wake). A claim whose holder
--          dies lapses after its lifetime and may be claimed again.

local sid, life = ARGV[2], tonumber(ARGV[3])
local now = now_ms()
local m = load_meta(sid)
local before = snapshot(sid, m)

local reason = nil
if m.res ~= '1' then reason = 'not_mirrored'
elseif m.ks ~= 'running' then reason = 'not_running'
elseif m.ph == 'w' then reason = 'busy'
elseif m.ph == 'h' and (not m.hx or tonumber(m.hx) > now) then reason = 'busy'
elseif before.n > 0 then reason = 'connected'
elseif not m.ito or m.ito == 'off' then reason = 'exempt'
else
  local due = redis.call('ZSCORE', K_DUE, sid)
  if not due or tonumber(due) > now then reason = 'not_due' end
end
if reason then
  refresh_due(sid, m, before.n)
  return { 'refused', reason }
end

set_meta(sid, m, 'ph', 'h')
set_meta(sid, m, 'hx', ms(now + life))
account(before, snapshot(sid, m))
refresh_due(sid, m, before.n)
return { 'claimed', m.gen or '' }
