-- The tracker's durable history (docs/api.md, "PostgreSQL"). Written by
-- tracker-reaper, read by tracker-api's history endpoint. The columns listed
-- there keep their names; anything else is ours to add.

-- One row per connection that ever ended: closed by its client or expired by
-- the sweep. Inserted idempotently on connection_id, so a batch replayed after
-- a crash writes nothing twice.
CREATE TABLE IF NOT EXISTS connection_history (
    connection_id     uuid        PRIMARY KEY,
    session_id        text        NOT NULL,
    user_id           text        NOT NULL,
    protocol          text        NOT NULL,
    client_ip         inet        NULL,
    user_agent        text        NULL,
    connected_at      timestamptz NOT NULL,
    disconnected_at   timestamptz NOT NULL,
    last_heartbeat_at timestamptz NOT NULL,
    end_reason        text        NOT NULL CHECK (end_reason IN ('closed', 'expired')),
    archived_at       timestamptz NOT NULL DEFAULT now()
);

-- History of a session and of a user, newest first (the API pages by `before`).
CREATE INDEX IF NOT EXISTS connection_history_session_time
    ON connection_history (session_id, disconnected_at DESC);
CREATE INDEX IF NOT EXISTS connection_history_user_time
    ON connection_history (user_id, disconnected_at DESC);

-- What the reaper did to a session: hibernated, woken, dry_run_hibernate, ...
-- event_id is made when the event is decided, so a retried insert is recognised.
CREATE TABLE IF NOT EXISTS session_events (
    event_id    uuid        PRIMARY KEY,
    session_id  text        NOT NULL,
    namespace   text        NOT NULL,
    event_type  text        NOT NULL,
    reason      text        NOT NULL,
    occurred_at timestamptz NOT NULL,
    details     jsonb       NOT NULL DEFAULT '{}'::jsonb
);

CREATE INDEX IF NOT EXISTS session_events_session_time
    ON session_events (session_id, occurred_at DESC);
