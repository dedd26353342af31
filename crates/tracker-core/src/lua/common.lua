-- common.lua: helpers prepended to every shard script (see scripts.rs).
--
-- It is the one place that names the keys inside a shard. Every key of a shard
-- shares the hash tag of its base, so a script may touch any of them on a Redis
-- Cluster; a session's keys live in its shard (shard = hash(session id)).
--
--   B = KEYS[1] = "<prefix>:{<shard>}"     the shard base (never a key itself)
--   B:conn        HASH   connection id -> cmsgpack {sid, uid, protocol, ip, ua ref, connected_ms}
--   B:ua, B:uan   HASH   user agent id -> text / -> number of connections using it.
--                        User agents repeat (one browser build, many users), so a
--                        connection keeps a 13-byte reference instead of the text.
--   B:live        ZSET   session id -> a lower bound of its connections' heartbeats
--                        (sweep index; heartbeats do not touch it, the sweep re-scores)
--   B:due         ZSET   session id -> ms its idle timeout is reached, or its claim lapses
--   B:wake        ZSET   session id -> ms a wake was requested (pending wakes)
--   B:outbox      STREAM finished connections awaiting the archiver
--   B:stats       HASH   maintained counters behind /v1/stats
--   B:known       SET    session ids mirrored from Session resources
--   B:epoch       STRING random marker; gone means the shard lost its data
--   B:s:<sid>:c   ZSET   connection id -> last heartbeat ms
--   B:s:<sid>:m   HASH   session metadata:
--       res "1" once a Session resource was mirrored; own owner; ks spec.state;
--       ito idle timeout ms or "off"; gen resource generation;
--       ph phase: "h" hibernating (claimed), "w" waking (wake pending);
--       hx claim lapses at (ms); nb no hibernation before (ms, after a rollback);
--       is idle since; ld last disconnect; lc last connection among those
--       already gone (the view adds the live ones) (all ms).
--   A session without resource gets a metadata hash only once a connection of
--   it ends, so a busy unknown session costs one sorted set and nothing more.
--
-- Time is the Redis server's (TIME) plus ARGV[1], an offset in ms that is 0 in
-- production and lets tests move the clock without sleeping.

local B = KEYS[1]
local K_CONN, K_LIVE, K_DUE, K_WAKE = B .. ':conn', B .. ':live', B .. ':due', B .. ':wake'
local K_OUTBOX, K_STATS, K_KNOWN = B .. ':outbox', B .. ':stats', B .. ':known'
local K_UA, K_UAN = B .. ':ua', B .. ':uan'
-- Metadata of a session nobody mirrored and nobody is connected to is kept this
-- long, so its view stays readable for a while, then it expires by itself.
local UNKNOWN_TTL_MS = 86400000

-- Integral ms as a decimal string: tostring() would switch to exponent form.
local function ms(x)
  return string.format('%.0f', x)
end

local function skey(sid, suffix)
  return B .. ':s:' .. sid .. ':' .. suffix
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
end

local function load_meta(sid)
  local flat = redis.call('HGETALL', skey(sid, 'm'))
  local m = {}
  for i = 1, #flat, 2 do
    m[flat[i]] = flat[i + 1]
  end
  return m
end

-- Writes a metadata field and keeps the Lua copy in step (nil deletes).
local function set_meta(sid, m, field, value)
  m[field] = value
  if value == nil then
    redis.call('HDEL', skey(sid, 'm'), field)
  else
    redis.call('HSET', skey(sid, 'm'), field, value)
  end
end

-- The reported state for a session with n connections; nil for a session
-- without resource and without connections (it is counted nowhere).
local function state_of(m, n)
  if m.res ~= '1' then
    if n > 0 then return 'unknown' end
    return nil
  end
  if m.ks == 'terminated' then return 'terminated' end
  if m.ph == 'h' then return 'hibernating' end
  if m.ph == 'w' then return 'waking' end
  if m.ks == 'hibernated' then return 'hibernated' end
  if n > 0 then return 'running' end
  return 'idle'
end

local function decode(raw)
  return cmsgpack.unpack(raw)
end

-- True when the session's connections belong to at least two users. Sessions
-- hold a handful of connections, so reading them beats keeping a per-user
-- hash for every session.
local function is_shared(sid)
  local ids = redis.call('ZRANGE', skey(sid, 'c'), 0, -1)
  if #ids < 2 then return false end
  local first = nil
  for _, cid in ipairs(ids) do
    local raw = redis.call('HGET', K_CONN, cid)
    if raw then
      local uid = decode(raw)[2]
      if first == nil then
        first = uid
      elseif uid ~= first then
        return true
      end
    end
  end
  return false
end

-- What the counters depend on. Counters count connections until they are
-- removed (closed or swept), so they may include a dead connection for up to
-- one sweep interval; views filter by time instead.
local function snapshot(sid, m)
  local n = redis.call('ZCARD', skey(sid, 'c'))
  return { state = state_of(m, n), n = n, shared = is_shared(sid) }
end

local function account(before, after)
  if before.state ~= after.state then
    if before.state then redis.call('HINCRBY', K_STATS, 'state:' .. before.state, -1) end
    if after.state then redis.call('HINCRBY', K_STATS, 'state:' .. after.state, 1) end
  end
  if (before.n > 0) ~= (after.n > 0) then
    redis.call('HINCRBY', K_STATS, 'sessions', after.n > 0 and 1 or -1)
  end
  if before.shared ~= after.shared then
    redis.call('HINCRBY', K_STATS, 'shared', after.shared and 1 or -1)
  end
end

-- Keeps the hibernation index exact: a session is in it iff it could be
-- claimed at its score. Called after every change to what it depends on.
local function refresh_due(sid, m, n)
  if m.ph == 'h' and m.hx then
    -- A claim whose holder died lapses; the next leader finds it here.
    redis.call('ZADD', K_DUE, m.hx, sid)
  elseif m.res == '1' and m.ks == 'running' and not m.ph and n == 0
      and m.ito and m.ito ~= 'off' and m.is then
    local at = tonumber(m.is) + tonumber(m.ito)
    if m.nb and tonumber(m.nb) > at then at = tonumber(m.nb) end
    redis.call('ZADD', K_DUE, at, sid)
  else
    redis.call('ZREM', K_DUE, sid)
  end
end

-- Re-scores the session in the sweep index at its oldest heartbeat.
local function refresh_live(sid)
  local first = redis.call('ZRANGE', skey(sid, 'c'), 0, 0, 'WITHSCORES')
  if first[2] then
    redis.call('ZADD', K_LIVE, first[2], sid)
  else
    redis.call('ZREM', K_LIVE, sid)
  end
end

-- A session that is neither mirrored nor connected keeps its metadata only for
-- a while; a mirrored or connected one keeps it for good.
local function keep_meta(sid, m, n)
  local key = skey(sid, 'm')
  if m.res ~= '1' and n == 0 then
    redis.call('PEXPIRE', key, UNKNOWN_TTL_MS)
  else
    redis.call('PERSIST', key)
  end
end

-- Interns a user agent; returns the reference the record keeps: '' for none,
-- '#<id>' for an interned text, '=<text>' when the id is taken by another
-- text (a 48-bit hash collision: keep the text inline rather than lie).
local function ua_ref(ua)
  if ua == '' then return '' end
  local id = string.sub(redis.sha1hex(ua), 1, 12)
  local stored = redis.call('HGET', K_UA, id)
  if stored and stored ~= ua then return '=' .. ua end
  if not stored then redis.call('HSET', K_UA, id, ua) end
  redis.call('HINCRBY', K_UAN, id, 1)
  return '#' .. id
end

local function ua_text(ref)
  local kind = string.sub(ref, 1, 1)
  if kind == '#' then return redis.call('HGET', K_UA, string.sub(ref, 2)) or '' end
  if kind == '=' then return string.sub(ref, 2) end
  return ''
end

local function ua_release(ref)
  if string.sub(ref, 1, 1) ~= '#' then return end
  local id = string.sub(ref, 2)
  if redis.call('HINCRBY', K_UAN, id, -1) <= 0 then
    redis.call('HDEL', K_UAN, id)
    redis.call('HDEL', K_UA, id)
  end
end

-- Removes a connection and appends its history record to the outbox in the
-- same script, so a finished connection is either live or in the outbox,
-- never neither.
local function finish_conn(sid, cid, rec, hb, ended, reason)
  redis.call('HDEL', K_CONN, cid)
  redis.call('ZREM', skey(sid, 'c'), cid)
  redis.call('HINCRBY', K_STATS, 'conns', -1)
  redis.call('HINCRBY', K_STATS, 'proto:' .. rec[3], -1)
  redis.call('XADD', K_OUTBOX, '*',
    'c', cid, 's', sid, 'u', rec[2], 'p', rec[3], 'ip', rec[4], 'ua', ua_text(rec[5]),
    'ca', ms(rec[6]), 'da', ms(ended), 'hb', ms(hb), 'r', reason)
  ua_release(rec[5])
end

-- After connections ended: the last-connection time survives them, and the
-- session is idle from `ended` once none is left.
local function note_ended(sid, m, n, connected, ended)
  if not m.lc or tonumber(m.lc) < connected then set_meta(sid, m, 'lc', ms(connected)) end
  if not m.ld or tonumber(m.ld) < ended then set_meta(sid, m, 'ld', ms(ended)) end
  if n == 0 then
    set_meta(sid, m, 'is', ms(ended))
    redis.call('ZREM', K_LIVE, sid)
  end
end

-- Flat connection fields: id, session, user, protocol, ip, ua, connected, heartbeat.
local function conn_fields(cid, rec, hb)
  return { cid, rec[1], rec[2], rec[3], rec[4], ua_text(rec[5]), ms(rec[6]), ms(hb) }
end

-- Flat session view: exists, state, owner, live, distinct users, last connection,
-- last disconnect, idle since, idle timeout ms, hibernates at ('' where none).
-- "Live" here is by time, as clients define it.
local function session_view(sid, m, now, window)
  local all = redis.call('ZRANGE', skey(sid, 'c'), 0, -1, 'WITHSCORES')
  local cutoff = now - window
  local users, distinct, live, newest_hb = {}, 0, 0, nil
  local last_conn = m.lc and tonumber(m.lc) or nil
  for i = 1, #all, 2 do
    local hb = tonumber(all[i + 1])
    local raw = redis.call('HGET', K_CONN, all[i])
    if raw then
      local rec = decode(raw)
      if not last_conn or rec[6] > last_conn then last_conn = rec[6] end
      if hb > cutoff then
        live = live + 1
        if not users[rec[2]] then
          users[rec[2]] = true
          distinct = distinct + 1
        end
      end
    end
    if not newest_hb or hb > newest_hb then newest_hb = hb end
  end
  local exists = (next(m) ~= nil or #all > 0) and '1' or '0'
  local idle_since = ''
  if live == 0 then
    if newest_hb then
      -- Dead but not yet swept: idle since the newest of them stopped being live.
      idle_since = ms(newest_hb + window)
    elseif m.is then
      idle_since = m.is
    end
  end
  local ito = ''
  if m.ito and m.ito ~= 'off' then ito = m.ito end
  local due = ''
  if m.res == '1' and m.ks == 'running' and not m.ph then
    due = redis.call('ZSCORE', K_DUE, sid) or ''
  end
  return { exists, state_of(m, live) or 'unknown', m.own or '', live, distinct,
    last_conn and ms(last_conn) or '', m.ld or '', idle_since, ito, due }
end
