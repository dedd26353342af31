-- session_view.lua: a session's state and counters.
--
-- KEYS     the shard keys (common.lua), then the session's keys
-- ARGV     clock offset ms, window ms, session id, '1' to add the warning
--          field (else nothing)
-- Returns  the 11 session view fields (the first is '0' if the tracker knows
--          nothing of the session); with the warning field, a 12th: the
--          deadline (ms) of the current running period whose clients are to
--          be warned of a hibernation for max duration, '' if none.
-- Atomic   a consistent snapshot of the session (read only).

local S = session_at(1, ARGV[3])
local m = load_meta(S)
local out = session_view(S, m, now_ms(), tonumber(ARGV[2]))
if ARGV[4] == '1' then
  out[#out + 1] = clients_warning(m)
end
return out
