-- The newest events of every session (GET /v1/events, the operator page):
-- without it, each look at the recent events reads the whole table.
CREATE INDEX IF NOT EXISTS session_events_time
    ON session_events (occurred_at DESC, event_id DESC);
