-- session_view.lua: a session's state and counters.
--
-- KEYS     the shard keys (common.lua), then the session's keys
-- ARGV     clock offset ms, window ms, session id
-- Returns  the 11 session view fields (the first is '0' if the tracker knows
--          nothing of the session).
-- Atomic   a consistent snapshot of the session (read only).

local S = session_at(1, ARGV[3])
return session_view(S, load_meta(S), now_ms(), tonumber(ARGV[2]))
