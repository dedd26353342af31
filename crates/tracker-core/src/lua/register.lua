-- register.lua: register a connection on a session.
--
-- KEYS     the shard keys (common.lua), then the session's keys
-- ARGV     clock offset ms, window ms, session id, connection id, user id,
--          protocol, client ip ('' if none), user agent ('' if none),
--          per-session limit (0 = none), '1' if the id index says this id was
--          registered before (then only a replay is possible), else '0', the
--          user who must own the session ('' for services and admins)
-- Returns  {'created'|'replayed', <8 connection fields>, <11 session view fields>}
--          {'terminated'} the Session is terminated;
--          {'session_limit'} the session already has its limit of live connections;
--          {'conflict'} the connection id names another connection: of another
--          session or user, one that is dead, or one that ended;
--          {'no_owner'} / {'other_owner'} the session has no owner, or another
--          user owns it, and the caller had to own it.
-- Atomic   the limit check with the insert; a replay with the first registration
--          (one id, one connection); the wake request with the state it reacts
--          to, so a registration racing a hibernation claim either lands before
--          the claim (which then fails) or records exactly one pending wake;
--          a user's ownership with the insert, so a Session created again for
--          someone else after the API's own check gets no connection of hers.

local window = tonumber(ARGV[2])
local S = session_at(1, ARGV[3])
local cid, uid, proto, ip, ua = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local limit = tonumber(ARGV[9])
local seen_before = ARGV[10] == '1'
local must_own = ARGV[11]
local now = now_ms()
local m = load_meta(S)

if must_own ~= '' then
  if not m.own then return { 'no_owner' } end
  if m.own ~= must_own then return { 'other_owner' } end
end

local existing = redis.call('HGET', K_CONN, cid)
if existing then
  local rec = decode(existing)
  local hb = redis.call('ZSCORE', S.c, cid)
  if rec[1] ~= S.id or rec[2] ~= uid or not hb or tonumber(hb) <= now - window then
    return { 'conflict' }
  end
  -- A retried registration proves the client is alive: it counts as a heartbeat.
  redis.call('ZADD', S.c, now, cid)
  local out = { 'replayed' }
  for _, v in ipairs(conn_fields(cid, rec, now)) do out[#out + 1] = v end
  for _, v in ipairs(session_view(S, m, now, window)) do out[#out + 1] = v end
  return out
end
if seen_before then
  -- Registered once and gone since (closed or swept): the id is used up.
  return { 'conflict' }
end

if m.res == '1' and m.ks == 'terminated' then
  return { 'terminated' }
end
if limit > 0 and live_count(S, now, window) >= limit then
  return { 'session_limit' }
end

local before = snapshot(S, m)
local rec = { S.id, uid, proto, ip, ua_ref(ua), now }
users_add(S, before.n, uid)
-- The view's last connection is the newer of lc and the start of any one
-- present connection: a connection registered while others are present
-- goes to lc, so every present one but the oldest is covered by lc, and the
-- oldest is no newer than the others.
if before.n > 0 and (not m.lc or tonumber(m.lc) < now) then set_meta(S, m, 'lc', ms(now)) end
redis.call('HSET', K_CONN, cid, cmsgpack.pack(rec))
redis.call('ZADD', S.c, now, cid)
redis.call('HINCRBY', K_STATS, 'conns', 1)
redis.call('HINCRBY', K_STATS, 'proto:' .. proto, 1)
if before.n == 0 then
  redis.call('ZADD', K_LIVE, now, S.id)
end
if m.is then set_meta(S, m, 'is', nil) end
if m.nb then set_meta(S, m, 'nb', nil) end
if m.res == '1' and (m.ph == 'h' or m.ks == 'hibernated') then
  request_wake(S, m, now)
end
local after = snapshot(S, m)
account(before, after)
refresh_due(S, m, after.n)
if next(m) ~= nil then keep_meta(S, m, after.n) end

local out = { 'created' }
for _, v in ipairs(conn_fields(cid, rec, now)) do out[#out + 1] = v end
for _, v in ipairs(session_view(S, m, now, window)) do out[#out + 1] = v end
return out
