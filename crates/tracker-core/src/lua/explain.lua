-- explain.lua: the facts behind a session's state, for "why is it awake?".
--
-- KEYS     the shard keys (common.lua), then the session's keys, then the
--          shard's leader facts (see common.lua)
-- ARGV     clock offset ms, window ms, session id, most live connections to
--          describe
-- Returns  the 11 session view fields (as session_view.lua), then 15 facts
--          ('' where none): now ms, spec.state, phase, idle timeout as
--          mirrored (ms or 'off'), its source, no hibernation before (ms),
--          claim lapses at (ms), max session duration ms, running since ms,
--          wake requested at (ms), leader facts present ('1' or '0'), guard
--          until (ms), dry run ('1' or ''), newest live heartbeat (ms),
--          resource mirrored ('1' or ''); then user, protocol and heartbeat
--          (ms) of the newest live connections, at most ARGV[4] of them.
-- Atomic   one consistent snapshot (read only). The work is bounded: the
--          view's, plus one range read and ARGV[4] record reads.

local S = session_at(1, ARGV[3])
local K_FACTS = KEYS[SHARD_KEYS + 4]
local window, most = tonumber(ARGV[2]), tonumber(ARGV[4])
local now = now_ms()
local m = load_meta(S)
local out = session_view(S, m, now, window)

local leader = redis.call('HGETALL', K_FACTS)
local facts = {}
for i = 1, #leader, 2 do
  facts[leader[i]] = leader[i + 1]
end

local live = redis.call('ZREVRANGEBYSCORE', S.c, '+inf', '(' .. ms(now - window),
  'WITHSCORES', 'LIMIT', 0, most)
local newest = live[2] or ''

local extra = { ms(now), m.ks or '', m.ph or '', m.ito or '', m.ios or '', m.nb or '',
  m.hx or '', m.md or '', m.rs or '', redis.call('ZSCORE', K_WAKE, S.id) or '',
  #leader > 0 and '1' or '0', facts.gu or '', facts.dr or '', newest, m.res or '' }
for _, v in ipairs(extra) do
  out[#out + 1] = v
end
for i = 1, #live, 2 do
  local raw = redis.call('HGET', K_CONN, live[i])
  if raw then
    local rec = decode(raw)
    out[#out + 1] = rec[2]
    out[#out + 1] = rec[3]
    out[#out + 1] = live[i + 1]
  end
end
return out
