-- claim_hibernation.lua: compare-and-set a session from idle to hibernating.
--
-- KEYS     the shard keys (common.lua), then the session's keys
-- ARGV     clock offset ms, window ms, session id, claim lifetime ms, leader term,
--          then optionally an announcement: event id, platform, reason
-- Returns  {'claimed', generation, uid, idle timeout ms} ('' where unknown) or
--          {'refused', reason}, reason one of 'fenced' (a newer leader wrote
--          here), 'not_mirrored', 'not_running', 'busy' (in another phase),
--          'connected', 'exempt', 'not_due'.
-- Atomic   the check that the session is mirrored, running, not exempt, without
--          any connection and past its idle timeout, with the move to
--          hibernating: a registration either lands first (claim refused) or
--          after (it sees 'hibernating' and records a wake). The claim carries
--          the claimer's term: only that term may finish or roll it back, and
--          a claim whose holder dies lapses after its lifetime.
--          With an announcement (the docker platform) the hibernate event is
--          queued for NATS in this same script, and the claim does not lapse:
--          it ends when NATS acknowledges the event (event_ack.lua), whichever
--          leader publishes it, so a NATS outage never leads to a second
--          claim and a second event.

local S = session_at(1, ARGV[3])
local life, term = tonumber(ARGV[4]), tonumber(ARGV[5])
local now = now_ms()
if fenced(term) then return { 'refused', 'fenced' } end
local m = load_meta(S)
local before = snapshot(S, m)

local reason = nil
if m.res ~= '1' then reason = 'not_mirrored'
elseif m.ks ~= 'running' then reason = 'not_running'
elseif m.ph == 'w' then reason = 'busy'
elseif m.ph == 'h' and (not m.hx or tonumber(m.hx) > now) then reason = 'busy'
elseif before.n > 0 then reason = 'connected'
elseif not m.ito or m.ito == 'off' then reason = 'exempt'
else
  local due = redis.call('ZSCORE', K_DUE, S.id)
  if not due or tonumber(due) > now then reason = 'not_due' end
end
if reason then
  refresh_due(S, m, before.n)
  return { 'refused', reason }
end

local eid = ARGV[6] or ''
set_meta(S, m, 'ph', 'h')
set_meta(S, m, 'ht', ms(term))
if eid ~= '' then
  set_meta(S, m, 'hx', nil)
  set_meta(S, m, 'he', eid)
  emit_event(S, m, eid, 'hibernate', ARGV[7], ARGV[8], now, true)
else
  set_meta(S, m, 'hx', ms(now + life))
end
account(before, snapshot(S, m))
refresh_due(S, m, before.n)
return { 'claimed', m.gen or '', m.uid or '', m.ito }
