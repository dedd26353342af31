-- session_view.lua: a session's state and counters.
--
-- KEYS[1]  shard base of the session
-- ARGV     clock offset ms, window ms, session id
-- Returns  the 10 session view fields (the first is '0' if the tracker knows
--          nothing of the session).
-- Atomic   a consistent snapshot of the session (read only).

local sid = ARGV[3]
return session_view(sid, load_meta(sid), now_ms(), tonumber(ARGV[2]))
