-- common.lua: helpers prepended to every shard script (see scripts.rs),
-- after meta.lua's.
--
-- Every key a script touches is declared in KEYS, so that a Redis Cluster
-- routes the call by its real keys: while a shard's slot is being migrated the
-- call is redirected (ASK) or refused (TRYAGAIN, retried by the client) instead
-- of running against half a shard. The names are built in one place, keys.rs;
-- this file only says where each one sits in KEYS. All keys of a shard share
-- the hash tag "{<shard>}", so they live in one slot.
--
--   KEYS[1]  conn     HASH   connection id -> cmsgpack {sid, uid, protocol, ip, ua ref, connected_ms}
--   KEYS[2]  live     ZSET   session id -> a lower bound of its connections' heartbeats
--                            (sweep index; heartbeats do not touch it, the sweep re-scores)
--   KEYS[3]  due      ZSET   session id -> ms it is next to be looked at: its idle
--                            timeout or max duration is reached, its clients are
--                            to be warned of the max duration, or its claim lapses
--   KEYS[4]  wake     ZSET   session id -> ms a wake was requested (pending wakes)
--   KEYS[5]  outbox   STREAM finished connections awaiting the archiver
--   KEYS[6]  stats    HASH   maintained counters behind /v1/stats
--   KEYS[7]  known    SET    session ids mirrored from Session resources
--   KEYS[8]  ua       HASH   user agent id -> text
--   KEYS[9]  uan      HASH   user agent id -> number of connections using it.
--                            User agents repeat (one browser build, many users), so a
--                            connection keeps a 13-byte reference instead of the text.
--   KEYS[10] term     STRING the newest leader term that wrote to this shard (fencing)
--   KEYS[11] wakesig  LIST   at most one element: "a wake was recorded here since the
--                            reaper last looked"; the reaper blocks on it (BLPOP)
--                            instead of polling the wake index
--   KEYS[12] events   STREAM session events (hibernate, wake, warning) awaiting
--                            NATS's acknowledgement; fields e event id, k kind,
--                            s session, u user, p platform, r reason, t ms,
--                            g the generation it was decided on, x "1" when its
--                            acknowledgement completes the state change it
--                            announces, su the session's uid
--   KEYS[13] archsig  LIST   at most one element: "history was appended to the outbox
--                            here since the archiver last looked" (same use as wakesig)
--   then, per session the script works on, three keys:
--            c        ZSET   connection id -> last heartbeat ms
--            u        HASH   user id -> number of its connections in c; present only
--                            while they belong to two users or more, so a session of
--                            one user (the common case) pays nothing for it
--            m        HASH   session metadata:
--       res "1" once a Session resource was mirrored; uid its metadata.uid;
--       du the uid of the last resource deleted under this name; own owner;
--       ks spec.state; ito idle timeout ms or "off"; ios where ito comes from
--       (IdleSource: s spec, d default, a annotation, e empty, x invalid);
--       gen resource generation (of a declared session: its declaration
--       counter); he / we the event id of a hibernate / wake announced to
--       NATS and not yet acknowledged; hn the hibernate event a claim's patch
--       announces once it is seen to land, whoever records that (Kubernetes
--       with NATS): "<event id> <platform> <reason>"; wk likewise, the wake
--       event of a wake patch sent, queued by whoever acknowledges the wake;
--       ph phase: "h" hibernating (claimed), "w" waking (wake pending);
--       hx claim lapses at (ms); ht term of the claim's holder;
--       hr why it was claimed: "idle" or "max_duration";
--       md max session duration ms (absent: none); rs when the session last
--       started running (ms; absent while not running): the period that md
--       limits; wb how long before that deadline clients are warned (ms;
--       absent: DEFAULT_WARN_BEFORE_MS); wn the deadline (ms) of the period
--       whose warning is recorded; wq "1" when that warning is not for
--       clients (dry run, or the deadline came first);
--       nb no hibernation before (ms, after a rollback);
--       lp / lx a hibernation patch whose answer was lost was released at /
--       may still land until (ms): a connection made since lp wakes the
--       session if the mirror sees it hibernated before lx;
--       is idle since; ld last disconnect; lc a lower bound of the last
--       connection: the newest start among connections gone or registered
--       while another one was there (the view adds any present one) (all ms).
--   The few scripts that need the shard's leader facts (HASH, written by the
--   leader with a lifetime: t term, gu no hibernation before (ms), dr '1' in
--   dry run, at written at) declare them last, after the session keys.
--   No script walks a session's connections but to list them or to expire
--   the dead ones: counts are kept as they change.
--   A session without resource gets a metadata hash only once a connection of
--   it ends, so a busy unknown session costs one sorted set and nothing more.
--
-- Time is the Redis server's (TIME) plus ARGV[1], an offset in ms that is 0 in
-- production and lets tests move the clock without sleeping.

local K_CONN, K_LIVE, K_DUE, K_WAKE = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_OUTBOX, K_STATS, K_KNOWN = KEYS[5], KEYS[6], KEYS[7]
local K_UA, K_UAN, K_TERM, K_WAKESIG = KEYS[8], KEYS[9], KEYS[10], KEYS[11]
local K_EVENTS = KEYS[12]
local K_ARCHSIG = KEYS[13]
local SHARD_KEYS = 13
-- Metadata of a session nobody mirrored and nobody is connected to is kept this
-- long, so its view stays readable for a while, then it expires by itself.
local UNKNOWN_TTL_MS = 86400000
-- Clients are warned this long before a max duration is reached when the
-- writer of the session's metadata did not say (the documented default).
local DEFAULT_WARN_BEFORE_MS = 300000

-- The i-th session (1-based) of this call: its id and its keys.
local function session_at(i, sid)
  local b = SHARD_KEYS + 3 * (i - 1)
  return { id = sid, c = KEYS[b + 1], u = KEYS[b + 2], m = KEYS[b + 3] }
end

-- True when `term` belongs to a leader that has been replaced: a newer term
-- already wrote to this shard. A newer term than stored is recorded, so the
-- first write of a new leader fences its predecessor here too.
local function fenced(term)
  local stored = tonumber(redis.call('GET', K_TERM) or '0')
  if term < stored then return true end
  if term > stored then redis.call('SET', K_TERM, ms(term)) end
  return false
end

-- Writes a metadata field and keeps the Lua copy in step (nil deletes).
local function set_meta(S, m, field, value)
  m[field] = value
  if value == nil then
    redis.call('HDEL', S.m, field)
  else
    redis.call('HSET', S.m, field, value)
  end
end

local function decode(raw)
  return cmsgpack.unpack(raw)
end

-- Connections whose last heartbeat is younger than the window, by time.
local function live_count(S, now, window)
  return redis.call('ZCOUNT', S.c, '(' .. ms(now - window), '+inf')
end

-- The user of some connection of the session (nil if none).
local function some_user(S)
  local first = redis.call('ZRANGE', S.c, 0, 0)
  if not first[1] then return nil end
  local raw = redis.call('HGET', K_CONN, first[1])
  if not raw then return nil end
  return decode(raw)[2]
end

-- A connection of `uid` joins the n already in the session (call before
-- adding it). The user hash appears once a second user does.
local function users_add(S, n, uid)
  if redis.call('EXISTS', S.u) == 1 then
    redis.call('HINCRBY', S.u, uid, 1)
    return
  end
  if n == 0 then return end
  local other = some_user(S)
  if other ~= nil and other ~= uid then
    redis.call('HSET', S.u, other, n, uid, 1)
  end
end

-- A connection of `uid` left the session; back to one user, the hash goes.
local function users_remove(S, uid)
  if redis.call('EXISTS', S.u) == 0 then return end
  if redis.call('HINCRBY', S.u, uid, -1) <= 0 then redis.call('HDEL', S.u, uid) end
  if redis.call('HLEN', S.u) <= 1 then redis.call('DEL', S.u) end
end

-- What the counters depend on. Counters count connections until they are
-- removed (closed or swept), so they may include a dead connection for up to
-- one sweep interval; views filter by time instead.
local function snapshot(S, m)
  local n = redis.call('ZCARD', S.c)
  return { state = state_of(m, n), n = n, shared = redis.call('EXISTS', S.u) == 1 }
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

-- The end of the running period a max duration limits (nil without one).
local function warn_before(m)
  return tonumber(m.wb or DEFAULT_WARN_BEFORE_MS)
end

-- When a running session with n connections is hibernated if nothing
-- changes: its idle timeout (only without connections) or its max duration,
-- whichever comes first, not before a rollback's retry time; nil if never.
local function hibernation_at(m, n)
  local at = nil
  if n == 0 and m.ito and m.ito ~= 'off' and m.is then
    at = tonumber(m.is) + tonumber(m.ito)
  end
  local deadline = max_deadline(m)
  if deadline and (not at or deadline < at) then at = deadline end
  if at and m.nb and tonumber(m.nb) > at then at = tonumber(m.nb) end
  return at
end

-- Keeps the hibernation index exact: a session is in it iff it could be
-- claimed (or its clients warned) at its score. Called after every change
-- to what it depends on.
local function refresh_due(S, m, n)
  if m.ph == 'h' and m.hx then
    -- A claim whose holder died lapses; the next leader finds it here.
    redis.call('ZADD', K_DUE, m.hx, S.id)
    return
  end
  local at = nil
  if m.res == '1' and m.ks == 'running' and not m.ph then
    at = hibernation_at(m, n)
    local deadline = max_deadline(m)
    if deadline and m.wn ~= ms(deadline) then
      local warn = deadline - warn_before(m)
      if not at or warn < at then at = warn end
    end
  end
  if at then
    redis.call('ZADD', K_DUE, ms(at), S.id)
  else
    redis.call('ZREM', K_DUE, S.id)
  end
end

-- A running period starts (first seen running, or woken): the max duration
-- counts from now, and its warning is still to come.
local function start_period(S, m, now)
  set_meta(S, m, 'rs', ms(now))
  set_meta(S, m, 'wn', nil)
  set_meta(S, m, 'wq', nil)
end

-- No longer running: no period, no deadline.
local function end_period(S, m)
  set_meta(S, m, 'rs', nil)
  set_meta(S, m, 'wn', nil)
  set_meta(S, m, 'wq', nil)
end

-- Records the session's one pending wake (later calls find ph = 'w' and add
-- none). Any claim is over: its holder's finish or rollback finds no 'h'.
local function request_wake(S, m, now)
  if m.ph == 'w' then return end
  set_meta(S, m, 'ph', 'w')
  set_meta(S, m, 'hx', nil)
  set_meta(S, m, 'ht', nil)
  set_meta(S, m, 'hr', nil)
  -- Ring the reaper's bell once: one element is enough to end its wait, and
  -- it reads every pending wake when it wakes up.
  if redis.call('ZADD', K_WAKE, 'NX', now, S.id) == 1 and redis.call('LLEN', K_WAKESIG) == 0 then
    redis.call('LPUSH', K_WAKESIG, '1')
  end
end

-- The promise "a session in use is never hibernated without a wake": whenever
-- the store learns that a session is (or is being made) hibernated while a
-- connection is live, a wake is recorded. Callers pass the state they just wrote.
local function wake_if_in_use(S, m, now, window)
  if m.res == '1' and m.ks == 'hibernated' and live_count(S, now, window) > 0 then
    request_wake(S, m, now)
  end
end

-- Re-scores the session in the sweep index at its oldest heartbeat.
local function refresh_live(S)
  local first = redis.call('ZRANGE', S.c, 0, 0, 'WITHSCORES')
  if first[2] then
    redis.call('ZADD', K_LIVE, first[2], S.id)
  else
    redis.call('ZREM', K_LIVE, S.id)
  end
end

-- A session that is neither mirrored nor connected keeps its metadata only for
-- a while; a mirrored or connected one keeps it for good.
local function keep_meta(S, m, n)
  if m.res ~= '1' and n == 0 then
    redis.call('PEXPIRE', S.m, UNKNOWN_TTL_MS)
  else
    redis.call('PERSIST', S.m)
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
-- never neither. The record names the Session resource (uid) the session was
-- when the connection ended, so a name reused by a new resource does not
-- show the old one's history.
local function finish_conn(S, m, cid, rec, hb, ended, reason)
  redis.call('HDEL', K_CONN, cid)
  redis.call('ZREM', S.c, cid)
  users_remove(S, rec[2])
  redis.call('HINCRBY', K_STATS, 'conns', -1)
  redis.call('HINCRBY', K_STATS, 'proto:' .. rec[3], -1)
  redis.call('XADD', K_OUTBOX, '*',
    'c', cid, 's', S.id, 'u', rec[2], 'p', rec[3], 'ip', rec[4], 'ua', ua_text(rec[5]),
    'ca', ms(rec[6]), 'da', ms(ended), 'hb', ms(hb), 'r', reason, 'su', m.uid or '')
  -- Ring the archiver's bell, once until it looks (see request_wake).
  if redis.call('LLEN', K_ARCHSIG) == 0 then redis.call('LPUSH', K_ARCHSIG, '1') end
  ua_release(rec[5])
end

-- After connections ended: the last-connection and last-disconnect times only
-- move forward, and once none is left the session is idle from its last
-- disconnect. Connections end out of order (a silent one is swept long after
-- a later one closed), so idle-since is the latest end, never the last seen.
local function note_ended(S, m, n, connected, ended)
  if not m.lc or tonumber(m.lc) < connected then set_meta(S, m, 'lc', ms(connected)) end
  if not m.ld or tonumber(m.ld) < ended then set_meta(S, m, 'ld', ms(ended)) end
  if n == 0 then
    if not m.is or tonumber(m.is) < tonumber(m.ld) then set_meta(S, m, 'is', m.ld) end
    redis.call('ZREM', K_LIVE, S.id)
  end
end

-- Ends the connections `listed` as ZRANGE ... WITHSCORES gives them (id,
-- heartbeat, ...): `ending(hb)` says when and why each ended. Appends to
-- `out` the session id if `named`, then the id and user of each one ended;
-- returns how many were listed, and the newest start and end among them (nil
-- if none), for note_ended.
local function end_listed(S, m, listed, ending, out, named)
  local last_conn, last_end = nil, nil
  for j = 1, #listed, 2 do
    local cid, hb = listed[j], tonumber(listed[j + 1])
    local ended, reason = ending(hb)
    local raw = redis.call('HGET', K_CONN, cid)
    if raw then
      local rec = decode(raw)
      finish_conn(S, m, cid, rec, hb, ended, reason)
      if named then out[#out + 1] = S.id end
      out[#out + 1] = cid
      out[#out + 1] = rec[2]
      if not last_conn or rec[6] > last_conn then last_conn = rec[6] end
    else
      -- Cannot happen while every writer goes through these scripts; heal it.
      redis.call('ZREM', S.c, cid)
    end
    if not last_end or ended > last_end then last_end = ended end
  end
  return #listed / 2, last_conn, last_end
end

-- Flat connection fields: id, session, user, protocol, ip, ua, connected, heartbeat.
local function conn_fields(cid, rec, hb)
  return { cid, rec[1], rec[2], rec[3], rec[4], ua_text(rec[5]), ms(rec[6]), ms(hb) }
end

-- Distinct users among the live connections: every user of the session,
-- less those whose connections are all dead but not yet swept. Beyond
-- O(log n), it costs O(dead), which the sweep keeps small.
local function live_users(S, n, live, cutoff)
  if live == 0 then return 0 end
  if redis.call('EXISTS', S.u) == 0 then return 1 end
  local distinct = redis.call('HLEN', S.u)
  if live == n then return distinct end
  local dead_of = {}
  for _, cid in ipairs(redis.call('ZRANGEBYSCORE', S.c, '-inf', ms(cutoff))) do
    local raw = redis.call('HGET', K_CONN, cid)
    if raw then
      local uid = decode(raw)[2]
      dead_of[uid] = (dead_of[uid] or 0) + 1
    end
  end
  for uid, dead in pairs(dead_of) do
    if tonumber(redis.call('HGET', S.u, uid) or '0') <= dead then distinct = distinct - 1 end
  end
  return distinct
end

-- The newest start among the session's connections, gone or present, given
-- any present one's id (nil if none): lc covers every one gone, and every
-- present one registered after the first of those present (see register.lua).
local function last_connection(S, m, any_cid)
  local last = m.lc and tonumber(m.lc) or nil
  local raw = any_cid and redis.call('HGET', K_CONN, any_cid)
  if raw then
    local connected = decode(raw)[6]
    if not last or connected > last then last = connected end
  end
  return last
end

-- Flat session view: exists, state, owner, live, distinct users, last connection,
-- last disconnect, idle since, idle timeout ms, hibernates at, resource uid
-- ('' where none). "Live" here is by time, as clients define it.
local function session_view(S, m, now, window)
  local n = redis.call('ZCARD', S.c)
  local cutoff = now - window
  local live, distinct, newest_hb = 0, 0, nil
  local last_conn = last_connection(S, m, nil)
  if n > 0 then
    live = redis.call('ZCOUNT', S.c, '(' .. ms(cutoff), '+inf')
    distinct = live_users(S, n, live, cutoff)
    local newest = redis.call('ZRANGE', S.c, -1, -1, 'WITHSCORES')
    newest_hb = tonumber(newest[2])
    last_conn = last_connection(S, m, newest[1])
  end
  local exists = known(m, n) and '1' or '0'
  local idle_since = ''
  if live == 0 then
    local since = m.is and tonumber(m.is) or nil
    -- No connection was live after the last one ended, even while dead ones
    -- wait for the sweep (idle-since is only set once none is left).
    if m.ld and (not since or tonumber(m.ld) > since) then since = tonumber(m.ld) end
    -- Dead but not yet swept: idle since the newest of them stopped being live.
    if newest_hb and (not since or newest_hb + window > since) then since = newest_hb + window end
    if since then idle_since = ms(since) end
  end
  local ito = ''
  if m.ito and m.ito ~= 'off' then ito = m.ito end
  local due = ''
  if m.res == '1' and m.ks == 'running' and not m.ph then
    local at = hibernation_at(m, n)
    if at then due = ms(at) end
  end
  return { exists, state_of(m, live) or 'unknown', m.own or '', live, distinct,
    last_conn and ms(last_conn) or '', m.ld or '', idle_since, ito, due, m.uid or '' }
end

-- Drops what a session recorded under one identity (a Session resource, or a
-- declaration): its state, generation, claim, retry delay, events announced
-- to NATS and running period, with any pending wake. Done when a new identity
-- takes the name, and when the session is forgotten; one list, so a field
-- added to the lifecycle is dropped everywhere.
local function drop_identity(S, m)
  for _, f in ipairs({ 'res', 'ks', 'gen', 'ph', 'hx', 'ht', 'hr', 'nb', 'lp', 'lx', 'he', 'hn', 'we', 'wk', 'rs', 'wn', 'wq' }) do
    set_meta(S, m, f, nil)
  end
  redis.call('ZREM', K_WAKE, S.id)
end

-- Records the settings a Session resource or a declaration gives, whole
-- (what one leaves out is unset), and lists the session as known.
local function record_settings(S, m, owner, ks, ito, ios, md, wb)
  set_meta(S, m, 'res', '1')
  set_meta(S, m, 'own', owner ~= '' and owner or nil)
  set_meta(S, m, 'ks', ks)
  set_meta(S, m, 'ito', ito)
  set_meta(S, m, 'ios', ios ~= '' and ios or nil)
  set_meta(S, m, 'md', md ~= '' and md or nil)
  set_meta(S, m, 'wb', wb)
  redis.call('SADD', K_KNOWN, S.id)
end

-- Queues a session event for NATS in the script that makes the change it
-- announces, so the change and its announcement happen together or not at
-- all. `finishes`: the event's acknowledgement completes the change (the
-- docker platform), so its entry carries the generation it was decided on.
local function emit_event(S, m, eid, kind, platform, reason, now, finishes)
  redis.call('XADD', K_EVENTS, '*', 'e', eid, 'k', kind, 's', S.id,
    'u', m.own or '', 'p', platform, 'r', reason, 't', ms(now),
    'g', m.gen or '', 'x', finishes and '1' or '0', 'su', m.uid or '')
end

-- An event one script keeps in a metadata field for whichever script later
-- makes the change it announces (hn, wk): "<event id> <platform> <reason>".
local function kept_event(eid, platform, reason)
  return table.concat({ eid, platform, reason }, ' ')
end

-- Queues the event kept in `field`, once: the field goes with it.
local function emit_kept(S, m, field, kind, now)
  if not m[field] then return end
  local eid, platform, reason = string.match(m[field], '^(%S+) (%S+) (%S+)$')
  if eid then emit_event(S, m, eid, kind, platform, reason, now, false) end
  set_meta(S, m, field, nil)
end

-- The hibernation a claim patched landed (a finish, or the mirror seeing it):
-- queue the hibernate event the claim carries, once, whoever records it.
local function announce_landing(S, m, now)
  emit_kept(S, m, 'hn', 'hibernate', now)
end

-- Follows a state the platform reports (a Session resource, or a declaration
-- through the API), whoever changed it: never fought. The caller has written
-- ks; `was` is the state known before ('nil' for a new session), `n` the
-- connections before. A pending wake is never cancelled here (only its own
-- completion does), a claim ends once the state shows the hibernation landed,
-- and a wake is recorded when the state is hibernated while a connection is live.
local function follow_state(S, m, was, n, now, window)
  if m.ks == 'running' and n == 0 and (was ~= 'running' or not m.is) then
    -- First seen running, or woken by anyone: idle from now (never earlier).
    if not m.is or tonumber(m.is) < now then set_meta(S, m, 'is', ms(now)) end
  end
  -- The running period (max duration) starts when the session is first seen
  -- running or woken by anyone, and ends with running.
  if m.ks == 'running' then
    if was ~= 'running' or not m.rs then start_period(S, m, now) end
  else
    end_period(S, m)
  end
  if m.hn and m.ks ~= 'running' then
    -- Hibernated from running while a claim was on (ended by a wake since,
    -- or not), or while its released patch could still land: the claim's
    -- hibernation happened, by our patch or someone else's. Anything else
    -- is not the claim's news.
    if m.ks == 'hibernated' and was == 'running'
        and (m.ph or (m.lx and now <= tonumber(m.lx))) then
      announce_landing(S, m, now)
    end
    set_meta(S, m, 'hn', nil)
  end
  if (m.ks == 'hibernated' and m.ph == 'h') or m.ks == 'terminated' then
    set_meta(S, m, 'ph', nil)
    set_meta(S, m, 'hx', nil)
    set_meta(S, m, 'ht', nil)
    set_meta(S, m, 'hr', nil)
  end
  if m.ks == 'terminated' then redis.call('ZREM', K_WAKE, S.id) end
  wake_if_in_use(S, m, now, window)
  if m.lp and m.ks ~= 'running' then
    -- Our released hibernation patch may be what landed, decided before a
    -- connection that has ended since (wake_if_in_use saw none live): that
    -- connection still asks for the session awake. Someone else's
    -- hibernation after lx is followed.
    local last = last_connection(S, m, redis.call('ZRANGE', S.c, 0, 0)[1])
    if m.ks == 'hibernated' and was == 'running' and now <= tonumber(m.lx)
        and last and last >= tonumber(m.lp) then
      request_wake(S, m, now)
    end
    set_meta(S, m, 'lp', nil)
    set_meta(S, m, 'lx', nil)
  end
end
