-- declare_session.lua: a session declared (or updated) through the API, for
-- platforms without Session resources (docker).
--
-- KEYS     the shard keys (common.lua), then the session's keys
-- ARGV     clock offset ms, window ms, session id, uid for a new session,
--          owner, state, idle timeout ms or 'off', max session duration ms
--          ('' if none), where the idle timeout comes from (see IdleSource),
--          warn-before ms
-- Returns  {1 if the session is new else 0, its generation after this call}
-- Atomic   the same metadata, indexes and rules as mirror_session.lua (a
--          declaration is what a Session resource is elsewhere), with the
--          ordering of writes. Ordering: a declaration comes from an API
--          replica, which has no leader term, so it is not fenced; instead
--          each one raises the session's generation by one, in Redis's own
--          order of execution, so of two concurrent declarations the later
--          one wins whole, never a mix. The reaper's own changes carry the
--          generation they were decided on (a claim and its hibernate event,
--          a wake event) and apply only if no declaration came since
--          (event_ack.lua): a controller's report is followed, never
--          overwritten by an older decision, and a declaration never regresses
--          behind one. A new session (none declared or mirrored under the
--          name) gets a fresh uid and starts at generation 1: what was
--          recorded for an earlier one (claim, events, retry delay) is dropped.

local window = tonumber(ARGV[2])
local S = session_at(1, ARGV[3])
local fresh_uid, owner, ks, ito, md = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local ios, wb = ARGV[9], ARGV[10]
local now = now_ms()
local m = load_meta(S)
local before = snapshot(S, m)
local created = m.res ~= '1'
if created then
  drop_identity(S, m)
  set_meta(S, m, 'du', nil)
  set_meta(S, m, 'uid', fresh_uid)
end
local was = (not created) and m.ks or nil
local gen = tonumber(m.gen or '0') + 1

record_settings(S, m, owner, ks, ito, ios, md, wb)
set_meta(S, m, 'gen', ms(gen))

follow_state(S, m, was, before.n, now, window)
account(before, snapshot(S, m))
refresh_due(S, m, before.n)
keep_meta(S, m, before.n)
return { created and 1 or 0, gen }
