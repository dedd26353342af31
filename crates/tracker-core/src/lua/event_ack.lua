-- event_ack.lua: NATS acknowledged a session event; drop it from the outbox
-- and complete the change it announced.
--
-- KEYS     the shard keys (common.lua), then the keys of the event's session
-- ARGV     clock offset ms, window ms, session id, leader term, stream entry id
-- Returns  'applied' (the announced state is recorded, or the controller
--          reported it already), 'noted' (dropped; the
--          state was not changed: the event completes nothing, or a
--          declaration or another resource came since), 'gone' (no such
--          entry: acknowledged before), 'fenced' (a newer leader wrote here;
--          nothing done, it publishes the event again under the same id).
-- Atomic   the removal of the event with the state change: a hibernate event
--          acknowledged is a hibernated session (its claim ends), a wake event
--          acknowledged a running one (the wake ends), each exactly once. The
--          change applies only if the session is still the one announced
--          (uid) and no declaration came since (generation; see
--          declare_session.lua): a controller's report wins. Whatever
--          happens, a session left hibernated with a live connection gets a
--          wake.

local window = tonumber(ARGV[2])
local S = session_at(1, ARGV[3])
local term, entry = tonumber(ARGV[4]), ARGV[5]
local now = now_ms()
if fenced(term) then return 'fenced' end
local found = redis.call('XRANGE', K_EVENTS, entry, entry)
if not found[1] then return 'gone' end
local ev = {}
local flat = found[1][2]
for i = 1, #flat, 2 do ev[flat[i]] = flat[i + 1] end
redis.call('XDEL', K_EVENTS, entry)
if ev.x ~= '1' or ev.s ~= S.id then return 'noted' end

local m = load_meta(S)
local before = snapshot(S, m)
local current = m.res == '1' and m.ks ~= 'terminated' and (m.uid or '') == (ev.su or '')
  and (ev.g == '' or tonumber(m.gen or '0') <= tonumber(ev.g))
local outcome = 'noted'
if ev.k == 'hibernate' then
  local mine = m.he == ev.e
  if mine then set_meta(S, m, 'he', nil) end
  if mine and m.ph == 'h' then
    set_meta(S, m, 'ph', nil)
    set_meta(S, m, 'hx', nil)
    set_meta(S, m, 'ht', nil)
    set_meta(S, m, 'hr', nil)
  end
  if current then
    set_meta(S, m, 'ks', 'hibernated')
    end_period(S, m)
    outcome = 'applied'
  elseif mine and m.res == '1' and m.ks == 'hibernated' then
    -- The controller reported it done before NATS's answer reached us.
    outcome = 'applied'
  end
elseif ev.k == 'wake' then
  local mine = m.we == ev.e
  if mine then
    set_meta(S, m, 'we', nil)
    if m.ph == 'w' then set_meta(S, m, 'ph', nil) end
  end
  if current then
    if m.ks ~= 'running' and before.n == 0 then set_meta(S, m, 'is', ms(now)) end
    -- Woken: a new running period (max duration) starts.
    if m.ks ~= 'running' then start_period(S, m, now) end
    set_meta(S, m, 'ks', 'running')
    outcome = 'applied'
  elseif mine and m.res == '1' and m.ks == 'running' then
    outcome = 'applied'
  end
end
wake_if_in_use(S, m, now, window)
account(before, snapshot(S, m))
refresh_due(S, m, before.n)
return outcome
