-- sweep.lua: claim up to N expired connections of one shard.
--
-- KEYS[1]  shard base
-- ARGV     clock offset ms, window ms, max connections to expire
-- Returns  flat triples {session id, connection id, user id, ...} of the
--          connections expired by this call (fewer than max: the shard is clean).
-- Atomic   per connection, removal with its outbox record (end_reason expired,
--          disconnected at last heartbeat + window), so two sweepers — two
--          leaders overlapping for a moment — never archive one twice.
--          Cost is O(expired · log n): the live index is ordered by each
--          session's oldest heartbeat.

local window = tonumber(ARGV[2])
local budget = tonumber(ARGV[3])
local now = now_ms()
local cutoff = now - window
local out = {}
local sessions = redis.call('ZRANGEBYSCORE', K_LIVE, '-inf', ms(cutoff), 'LIMIT', 0, budget)
for _, sid in ipairs(sessions) do
  if budget <= 0 then break end
  local ckey = skey(sid, 'c')
  local m = load_meta(sid)
  local before = snapshot(sid, m)
  local dead = redis.call('ZRANGEBYSCORE', ckey, '-inf', ms(cutoff), 'WITHSCORES', 'LIMIT', 0, budget)
  local last_end = nil
  for i = 1, #dead, 2 do
    local cid, hb = dead[i], tonumber(dead[i + 1])
    local raw = redis.call('HGET', K_CONN, cid)
    if raw then
      local rec = decode(raw)
      finish_conn(sid, cid, rec, hb, hb + window, 'expired')
      out[#out + 1] = sid
      out[#out + 1] = cid
      out[#out + 1] = rec[2]
    else
      -- Cannot happen while every writer goes through these scripts; heal it.
      redis.call('ZREM', ckey, cid)
    end
    budget = budget - 1
    if not last_end or hb + window > last_end then last_end = hb + window end
  end
  local after = snapshot(sid, m)
  if last_end then
    if after.n == 0 then set_meta(sid, m, 'is', ms(last_end)) end
    if not m.ld or tonumber(m.ld) < last_end then set_meta(sid, m, 'ld', ms(last_end)) end
  end
  refresh_live(sid)
  account(before, after)
  refresh_due(sid, m, after.n)
  keep_meta(sid, m, after.n)
end
return out
