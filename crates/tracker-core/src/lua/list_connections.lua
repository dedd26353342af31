-- list_connections.lua: the live connections of a session, oldest heartbeat first.
--
-- KEYS     the shard keys (common.lua), then the session's keys
-- ARGV     clock offset ms, window ms, session id
-- Returns  {<8 connection fields>, <8 connection fields>, ...}
-- Atomic   a consistent snapshot of the session (read only).

local window = tonumber(ARGV[2])
local S = session_at(1, ARGV[3])
local live = redis.call('ZRANGEBYSCORE', S.c, '(' .. ms(now_ms() - window), '+inf', 'WITHSCORES')
local out = {}
for i = 1, #live, 2 do
  local raw = redis.call('HGET', K_CONN, live[i])
  if raw then
    for _, v in ipairs(conn_fields(live[i], decode(raw), tonumber(live[i + 1]))) do
      out[#out + 1] = v
    end
  end
end
return out
