-- claim_hibernation.lua: compare-and-set a session from running to hibernating,
-- or record that its clients are to be warned of its max duration.
--
-- KEYS     the shard keys (common.lua), then the session's keys
-- ARGV     clock offset ms, window ms, session id, claim lifetime ms, leader
--          term, '1' for a dry run (end no connection, warn no client) else '0',
--          then optionally an announcement of the hibernation: event id,
--          platform, reason (the claim's own reason replaces it for a max
--          duration), and of a warning: event id, platform, reason (unused:
--          always max_duration) ('' each for none), then '1' when the
--          hibernation's announcement is for its landing (Kubernetes with
--          NATS) rather than for the claim (the docker platform)
-- Returns  {'claimed', generation, uid, idle timeout ms or 'off', reason,
--          max duration ms, connection id, user id, ...} ('' where unknown),
--          reason 'idle' or 'max_duration', then the connections the claim
--          ended; or {'warned', deadline ms, owner, uid} when the warning
--          before the max duration was recorded now (once per running
--          period); or {'refused', reason}, reason one of 'fenced' (a newer
--          leader wrote here), 'not_mirrored', 'not_running', 'busy' (in
--          another phase), 'connected', 'exempt', 'not_due'.
-- Atomic   the checks with the move to hibernating: for an idle claim, that
--          the session is mirrored, running, not exempt, without any
--          connection and past its idle timeout, so a registration either
--          lands first (claim refused) or after (it sees 'hibernating' and
--          records a wake); for a max duration claim, that the running period
--          is over, with ending every connection of the session (history
--          record in the outbox, end_reason max_duration, or expired for one
--          already dead), so each ends exactly once and a registration after
--          the claim records a wake. The warning is recorded with the period
--          it belongs to, so two leaders never record it twice. The claim
--          carries the claimer's term: only that term may finish or roll it
--          back, and a claim whose holder dies lapses after its lifetime.
--          With an announcement (the docker platform) the hibernate event is
--          queued for NATS in this same script, and the claim does not lapse:
--          it ends when NATS acknowledges the event (event_ack.lua), whichever
--          leader publishes it, so a NATS outage never leads to a second
--          claim and a second event. A warning's event (where NATS is
--          configured) is queued with the warning, so it is published
--          exactly when the warning is recorded, whatever happens next.
--          Kubernetes with NATS: the claim carries its hibernate event (hn)
--          for whoever records the patch's landing, a finish or the mirror
--          (announce_landing in common.lua), so a landing recorded by another
--          leader, or found late by a read or the watch, is announced too.
--          An earlier patch released as unsure (lp/lx) is held to this new
--          decision: connections made before it no longer ask for a wake
--          if a hibernation lands.

local window = tonumber(ARGV[2])
local S = session_at(1, ARGV[3])
local life, term, dry = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6] == '1'
local now = now_ms()
if fenced(term) then return { 'refused', 'fenced' } end
local m = load_meta(S)
local before = snapshot(S, m)

local reason, kind = nil, nil
local deadline = max_deadline(m)
if m.res ~= '1' then reason = 'not_mirrored'
elseif m.ks ~= 'running' then reason = 'not_running'
elseif m.ph == 'w' then reason = 'busy'
elseif m.ph == 'h' and (not m.hx or tonumber(m.hx) > now) then reason = 'busy'
elseif deadline and now >= deadline then
  if m.nb and tonumber(m.nb) > now then reason = 'not_due' else kind = 'max_duration' end
elseif deadline and now >= deadline - warn_before(m) and m.wn ~= ms(deadline) then
  set_meta(S, m, 'wn', ms(deadline))
  set_meta(S, m, 'wq', dry and '1' or nil)
  if not dry and (ARGV[10] or '') ~= '' then
    emit_event(S, m, ARGV[10], 'warning', ARGV[11], 'max_duration', now, false)
  end
  refresh_due(S, m, before.n)
  return { 'warned', ms(deadline), m.own or '', m.uid or '' }
elseif before.n > 0 then reason = 'connected'
elseif not m.ito or m.ito == 'off' then reason = 'exempt'
else
  local at = nil
  if m.is then at = tonumber(m.is) + tonumber(m.ito) end
  if at and m.nb and tonumber(m.nb) > at then at = tonumber(m.nb) end
  if not at or at > now then reason = 'not_due' else kind = 'idle' end
end
if reason then
  refresh_due(S, m, before.n)
  return { 'refused', reason }
end

local eid = ARGV[7] or ''
set_meta(S, m, 'ph', 'h')
set_meta(S, m, 'ht', ms(term))
set_meta(S, m, 'hr', kind)
if m.lp then
  -- An earlier patch released as unsure may still land. This claim is a new
  -- decision, made with every connection since that release gone: if a
  -- hibernation lands now (that patch or this claim's), only connections
  -- made from now on ask for a wake.
  if tonumber(m.lx) > now then
    set_meta(S, m, 'lp', ms(now))
  else
    set_meta(S, m, 'lp', nil)
    set_meta(S, m, 'lx', nil)
  end
end
local out = { 'claimed', m.gen or '', m.uid or '', m.ito or 'off', kind, m.md or '' }
if kind == 'max_duration' then
  -- Reached without a warning (the deadline came first): none afterwards.
  if m.wn ~= ms(deadline) then
    set_meta(S, m, 'wn', ms(deadline))
    set_meta(S, m, 'wq', '1')
  end
  if not dry then
    local present = redis.call('ZRANGE', S.c, 0, -1, 'WITHSCORES')
    local function ending(hb)
      -- Dead already: history says so, as the sweep would have.
      if hb <= now - window then return hb + window, 'expired' end
      return now, 'max_duration'
    end
    local _, last_conn, last_end = end_listed(S, m, present, ending, out, false)
    if last_conn then note_ended(S, m, 0, last_conn, last_end) end
  end
end
local why = kind == 'max_duration' and 'max_duration' or ARGV[9]
if eid ~= '' and ARGV[13] ~= '1' then
  set_meta(S, m, 'hx', nil)
  set_meta(S, m, 'he', eid)
  emit_event(S, m, eid, 'hibernate', ARGV[8], why, now, true)
else
  set_meta(S, m, 'hx', ms(now + life))
  -- Always written: an older claim's event is not this one's.
  set_meta(S, m, 'hn', eid ~= '' and kept_event(eid, ARGV[8], why) or nil)
end
local after = snapshot(S, m)
account(before, after)
refresh_due(S, m, after.n)
keep_meta(S, m, after.n)
return out
