-- mirror_session.lua: record what the Session resource says (the reaper's mirror).
--
-- KEYS     the shard keys (common.lua), then the session's keys
-- ARGV     clock offset ms, window ms, session id, leader term, resource uid,
--          owner ('' if none), spec.state, idle timeout ms or 'off' (exempt,
--          or empty spec.idleTimeout), metadata.generation ('' if unknown),
--          where the idle timeout comes from ('' if unknown; see IdleSource),
--          max session duration ms ('' if none), warn-before ms, the
--          resource's creation time ms ('' if unknown)
-- Returns  1 if applied; 0 if stale (an older generation of the same resource,
--          or a resource already deleted); -1 if fenced (a newer leader wrote here).
-- Atomic   the metadata with the idle bookkeeping, the hibernation index and
--          the wake index. A session is its resource: a new uid under a known
--          name is a new session (generations restart), so what was recorded
--          for the old one (claim, retry delay, generation) is dropped. A state
--          changed by someone else is followed, not fought: the mirror never
--          cancels a pending wake (only the wake's own patch does), it ends our
--          claim once the resource shows the hibernation landed, and it records
--          a wake when the resource is hibernated while a connection is live,
--          or when a connection was made since the resource was created.

local window = tonumber(ARGV[2])
local S = session_at(1, ARGV[3])
local term, uid, owner, ks, ito, gen = tonumber(ARGV[4]), ARGV[5], ARGV[6], ARGV[7], ARGV[8], tonumber(ARGV[9])
local ios, md, wb, created = ARGV[10], ARGV[11], ARGV[12], tonumber(ARGV[13])
local now = now_ms()
if fenced(term) then return -1 end
local m = load_meta(S)
if uid ~= '' and m.du == uid then return 0 end
local before = snapshot(S, m)
if uid ~= '' and m.uid and m.uid ~= uid then
  -- Another resource under the same name: nothing of the old one applies,
  -- not even a pending wake (wake_if_in_use below asks again if someone is
  -- connected).
  drop_identity(S, m)
elseif gen and m.gen and gen < tonumber(m.gen) then
  return 0
end
local was = m.res == '1' and m.ks or nil

set_meta(S, m, 'uid', uid ~= '' and uid or nil)
record_settings(S, m, owner, ks, ito, ios, md, wb)
if gen then set_meta(S, m, 'gen', ms(gen)) end

follow_state(S, m, was, before.n, now, window)
-- A resource new to the store may have been connected to before the store
-- knew it (a lagging watch, a delete and create seen as one change): the
-- registration then saw the old resource, or none, and the wake it asked for
-- was dropped with the old identity, or never asked. A connection made since
-- the creation (lc: the newest connection's start) was made to this resource,
-- so it is woken, even if that connection has ended (or died and waits for
-- the sweep: a present one counts as much as a gone one). creationTimestamp has
-- whole seconds: a connection up to a second before the creation counts too,
-- and wakes a hibernated session once more than needed, never once less.
if was == nil and created and m.ks == 'hibernated' then
  local last = last_connection(S, m, redis.call('ZRANGE', S.c, 0, 0)[1])
  if last and last >= created then request_wake(S, m, now) end
end
account(before, snapshot(S, m))
refresh_due(S, m, before.n)
keep_meta(S, m, before.n)
return 1
