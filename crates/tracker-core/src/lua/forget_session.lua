-- forget_session.lua: the Session resource was deleted.
--
-- KEYS     the shard keys (common.lua), then the session's keys
-- ARGV     clock offset ms, window ms, session id, leader term ('' for a
--          declared session removed through the API: no leader's write, not
--          fenced), uid of the deleted resource ('' if unknown: forget
--          whatever is mirrored)
-- Returns  1 if the session was mirrored and is now forgotten; 0 if not
--          mirrored, or another resource is mirrored under the name; -1 if fenced.
-- Atomic   dropping the mirrored fields with the indexes that depend on them.
--          The deleted uid (without one, the uid mirrored) is remembered, so a
--          late event of the deleted resource does not bring it back. Live
--          connections stay until they close or expire.

local S = session_at(1, ARGV[3])
local term, uid = tonumber(ARGV[4]), ARGV[5]
if term and fenced(term) then return -1 end
local m = load_meta(S)
if uid ~= '' and m.uid and m.uid ~= uid then
  -- A newer resource already took the name; only remember the old one is gone.
  set_meta(S, m, 'du', uid)
  return 0
end
-- Without a uid, whatever is mirrored is gone: remember that one.
local gone = uid
if gone == '' then gone = m.uid or '' end
local before = snapshot(S, m)
local was = redis.call('SREM', K_KNOWN, S.id)
-- Events already queued are still published; their acknowledgement finds
-- nothing to complete.
drop_identity(S, m)
for _, f in ipairs({ 'uid', 'own', 'ito', 'ios', 'md', 'wb' }) do
  set_meta(S, m, f, nil)
end
local after = snapshot(S, m)
account(before, after)
refresh_due(S, m, after.n)
if after.n == 0 then
  -- Nothing left to show: the session is forgotten but for the tombstone and
  -- the newest connection's start, which a resource created again under the
  -- name needs (mirror_session.lua: a connection made since its creation wakes it).
  local lc = m.lc
  redis.call('DEL', S.m)
  m = {}
  if lc then set_meta(S, m, 'lc', lc) end
end
if gone ~= '' then set_meta(S, m, 'du', gone) end
keep_meta(S, m, after.n)
return was
