-- forget_session.lua: the Session resource was deleted.
--
-- KEYS[1]  shard base of the session
-- ARGV     clock offset ms, session id
-- Returns  1 if the session was mirrored, else 0.
-- Atomic   dropping the mirrored fields with the indexes that depend on them.
--          Live connections stay until they close or expire; a session left
--          with nothing is forgotten entirely.

local sid = ARGV[2]
local m = load_meta(sid)
local before = snapshot(sid, m)
local was = redis.call('SREM', K_KNOWN, sid)
redis.call('ZREM', K_WAKE, sid)
for _, f in ipairs({ 'res', 'own', 'ks', 'ito', 'gen', 'ph', 'hx', 'nb' }) do
  set_meta(sid, m, f, nil)
end
local after = snapshot(sid, m)
account(before, after)
refresh_due(sid, m, after.n)
if after.n == 0 then
  redis.call('DEL', skey(sid, 'm'))
else
  keep_meta(sid, m, after.n)
end
return was
