-- sweep.lua: claim up to N expired connections of one shard.
--
-- KEYS[1]  shard base
-- ARGV     clock offset ms, window ms, max connections to expire
-- Returns  {more, session id, connection id, user id, ...}: the connections
--          expired by this call; more = 1 when the budget ran out before the
--          shard was clean (call again), else 0.
-- Atomic   per connection, removal with its outbox record (end_reason expired,
--          disconnected at last heartbeat + window), so two sweepers — two
--          leaders overlapping for a moment — never archive one twice.
--          Cost is O((expired + sessions re-scored) · log n): the live index
--          holds a lower bound of each session's oldest heartbeat, so only
--          sessions that may hold a dead connection are examined, and a live
--          session at most once per window.

local window = tonumber(ARGV[2])
local budget = tonumber(ARGV[3])
local now = now_ms()
local cutoff = now - window
local out = { 0 }
local left = budget
local sessions = redis.call('ZRANGEBYSCORE', K_LIVE, '-inf', ms(cutoff), 'LIMIT', 0, budget)
if #sessions == budget then out[1] = 1 end
for _, sid in ipairs(sessions) do
  if left <= 0 then
    out[1] = 1
    break
  end
  local ckey = skey(sid, 'c')
  local m = load_meta(sid)
  local before = snapshot(sid, m)
  local dead = redis.call('ZRANGEBYSCORE', ckey, '-inf', ms(cutoff), 'WITHSCORES', 'LIMIT', 0, left)
  local last_end, last_conn = nil, nil
  for i = 1, #dead, 2 do
    local cid, hb = dead[i], tonumber(dead[i + 1])
    local raw = redis.call('HGET', K_CONN, cid)
    if raw then
      local rec = decode(raw)
      finish_conn(sid, cid, rec, hb, hb + window, 'expired')
      out[#out + 1] = sid
      out[#out + 1] = cid
      out[#out + 1] = rec[2]
      if not last_conn or rec[6] > last_conn then last_conn = rec[6] end
    else
      -- Cannot happen while every writer goes through these scripts; heal it.
      redis.call('ZREM', ckey, cid)
    end
    left = left - 1
    if not last_end or hb + window > last_end then last_end = hb + window end
  end
  local after = snapshot(sid, m)
  if last_conn then
    note_ended(sid, m, after.n, last_conn, last_end)
  end
  -- Heartbeats left the index score behind; move it to the oldest heartbeat
  -- so this session is examined again only once that one is due.
  refresh_live(sid)
  account(before, after)
  refresh_due(sid, m, after.n)
  keep_meta(sid, m, after.n)
end
return out
