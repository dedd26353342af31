-- sweep.lua: expire up to N dead connections of some sessions of one shard.
--
-- KEYS     the shard keys (common.lua), then the keys of each candidate session
--          (from sweep_candidates.lua), in ARGV order
-- ARGV     clock offset ms, window ms, max connections to expire, then the
--          candidate session ids
-- Returns  {more, session id, connection id, user id, ...}: the connections
--          expired by this call; more = 1 when the budget ran out before every
--          candidate was clean (call again), else 0.
-- Atomic   per connection, removal with its outbox record (end_reason expired,
--          disconnected at last heartbeat + window), so two sweepers — two
--          leaders overlapping for a moment — never archive one twice.
--          Cost is O((expired + sessions re-scored) · log n): the live index
--          holds a lower bound of each session's oldest heartbeat, so only
--          sessions that may hold a dead connection are examined, and a live
--          session at most once per window.

local window = tonumber(ARGV[2])
local left = tonumber(ARGV[3])
local now = now_ms()
local cutoff = now - window
local out = { 0 }
-- Silent for a window: ended then, as history says.
local function expired(hb) return hb + window, 'expired' end
for i = 4, #ARGV do
  if left <= 0 then
    out[1] = 1
    break
  end
  local S = session_at(i - 3, ARGV[i])
  local m = load_meta(S)
  local before = snapshot(S, m)
  local dead = redis.call('ZRANGEBYSCORE', S.c, '-inf', ms(cutoff), 'WITHSCORES', 'LIMIT', 0, left)
  local n, last_conn, last_end = end_listed(S, m, dead, expired, out, true)
  left = left - n
  -- The budget ran out inside this session: it may hold more dead ones.
  if left <= 0 and redis.call('ZCOUNT', S.c, '-inf', ms(cutoff)) > 0 then out[1] = 1 end
  local after = snapshot(S, m)
  if last_conn then
    note_ended(S, m, after.n, last_conn, last_end)
  end
  -- Heartbeats left the index score behind; move it to the oldest heartbeat
  -- so this session is examined again only once that one is due.
  refresh_live(S)
  account(before, after)
  refresh_due(S, m, after.n)
  keep_meta(S, m, after.n)
end
return out
