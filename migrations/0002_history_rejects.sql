-- Outbox entries the archiver set aside instead of archiving, so that one bad
-- entry does not stop its shard: PostgreSQL refused the row for its data
-- (a NUL byte in a text, a value out of range), its connection id already
-- belongs to another connection's row, or the entry is not a history record.
-- The entry leaves the outbox once its reject row is committed.
-- See docs/operations.md for inspecting and replaying them.
CREATE TABLE IF NOT EXISTS connection_history_rejects (
    reject_id     bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- NULL when the entry's own connection id does not parse.
    connection_id uuid        NULL,
    -- The outbox entry as JSON: {"shard", "entry_id", "record"} for a history
    -- record, {"shard", "entry_id", "fields"} for an entry that is not one.
    -- NUL bytes are escaped (\u0000); it is text, not jsonb, which refuses them.
    payload       text        NOT NULL,
    -- PostgreSQL's message and SQLSTATE, or the archiver's reason.
    error         text        NOT NULL,
    rejected_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS connection_history_rejects_time
    ON connection_history_rejects (rejected_at);

-- One row per outbox entry: a batch replayed after a crash between this
-- commit and the outbox acknowledgement records nothing twice. The payload
-- names its shard and stream entry id, so equal payloads are the same entry.
-- On its hash: a payload can exceed what a btree entry may hold.
CREATE UNIQUE INDEX IF NOT EXISTS connection_history_rejects_entry
    ON connection_history_rejects (md5(payload));
