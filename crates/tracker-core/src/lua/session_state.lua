-- session_state.lua: what a WebSocket session watch looks at every interval,
-- the session's state and its clients' warning, without the view's counts
-- and without the shard's keys. The watch reads the whole view
-- (session_view.lua) only when this changed.
--
-- KEYS     the session's connection set (c), then its metadata (m)
-- ARGV     clock offset ms, window ms
-- Returns  {'0'} if the tracker knows nothing of the session; else {'1',
--          state, warning}: the state as the view reports it, and the
--          deadline (ms) whose clients are to be warned, '' if none.
-- Atomic   a consistent read of the two keys (read only).

local m = load_meta({ m = KEYS[2] })
local n = redis.call('ZCARD', KEYS[1])
if not known(m, n) then return { '0' } end
local live = 0
if n > 0 then
  live = redis.call('ZCOUNT', KEYS[1], '(' .. ms(now_ms() - tonumber(ARGV[2])), '+inf')
end
return { '1', state_of(m, live) or 'unknown', clients_warning(m) }
