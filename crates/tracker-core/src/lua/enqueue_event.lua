-- enqueue_event.lua: queue a session event for NATS that completes nothing
-- (a hibernate or wake already carried out on Kubernetes, a warning).
--
-- KEYS     the shard keys (common.lua), then the session's keys
-- ARGV     clock offset ms, window ms, session id, event id, kind, platform,
--          reason, user ('' for the session's owner)
-- Returns  1
-- Atomic   nothing beyond the append; the session's keys are declared for
--          the owner and uid the event names.

local S = session_at(1, ARGV[3])
local m = load_meta(S)
local user = ARGV[8]
if user == '' then user = nil end
emit_event(S, m, ARGV[4], ARGV[5], ARGV[6], ARGV[7], now_ms(), false, user)
return 1
