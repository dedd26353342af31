-- register.lua: register a connection on a session.
--
-- KEYS[1]  shard base of the session
-- ARGV     clock offset ms, window ms, session id, connection id, user id,
--          protocol, client ip ('' if none), user agent ('' if none),
--          per-session limit (0 = none)
-- Returns  {'created'|'replayed', <8 connection fields>, <10 session view fields>}
--          {'terminated'} the Session is terminated;
--          {'session_limit'} the session already has its limit of live connections;
--          {'conflict'} the connection id is taken in this shard by another session,
--          or by a connection that is already dead.
-- Atomic   the limit check with the insert; a replay with the first registration
--          (one id, one connection); the wake request with the state it reacts
--          to, so a registration racing a hibernation claim either lands before
--          the claim (which then fails) or records exactly one pending wake.

local window = tonumber(ARGV[2])
local sid, cid, uid, proto, ip, ua = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local limit = tonumber(ARGV[9])
local now = now_ms()
local ckey = skey(sid, 'c')
local m = load_meta(sid)

local existing = redis.call('HGET', K_CONN, cid)
if existing then
  local rec = decode(existing)
  local hb = redis.call('ZSCORE', ckey, cid)
  if rec[1] ~= sid or not hb or tonumber(hb) <= now - window then
    return { 'conflict' }
  end
  -- A retried registration proves the client is alive: it counts as a heartbeat.
  redis.call('ZADD', ckey, now, cid)
  local out = { 'replayed' }
  for _, v in ipairs(conn_fields(cid, rec, now)) do out[#out + 1] = v end
  for _, v in ipairs(session_view(sid, m, now, window)) do out[#out + 1] = v end
  return out
end

if m.res == '1' and m.ks == 'terminated' then
  return { 'terminated' }
end
if limit > 0 and redis.call('ZCOUNT', ckey, '(' .. ms(now - window), '+inf') >= limit then
  return { 'session_limit' }
end

local before = snapshot(sid, m)
local rec = { sid, uid, proto, ip, ua_ref(ua), now }
redis.call('HSET', K_CONN, cid, cmsgpack.pack(rec))
redis.call('ZADD', ckey, now, cid)
redis.call('HINCRBY', K_STATS, 'conns', 1)
redis.call('HINCRBY', K_STATS, 'proto:' .. proto, 1)
if before.n == 0 then
  redis.call('ZADD', K_LIVE, now, sid)
end
if m.is then set_meta(sid, m, 'is', nil) end
if m.nb then set_meta(sid, m, 'nb', nil) end
if m.res == '1' and (m.ph == 'h' or (not m.ph and m.ks == 'hibernated')) then
  -- One pending wake per session: later registrations find ph = 'w' and add none.
  set_meta(sid, m, 'ph', 'w')
  set_meta(sid, m, 'hx', nil)
  redis.call('ZADD', K_WAKE, 'NX', now, sid)
end
local after = snapshot(sid, m)
account(before, after)
refresh_due(sid, m, after.n)
if next(m) ~= nil then keep_meta(sid, m, after.n) end

local out = { 'created' }
for _, v in ipairs(conn_fields(cid, rec, now)) do out[#out + 1] = v end
for _, v in ipairs(session_view(sid, m, now, window)) do out[#out + 1] = v end
return out
