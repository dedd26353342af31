-- connection_history becomes a table partitioned by month on disconnected_at,
-- so that retention drops whole months instead of deleting rows, and a
-- month's queries read that month only. The reaper creates the coming
-- months' partitions and drops those past TRACKER_HISTORY_RETENTION; see
-- docs/operations.md. Every row of the table as it was is copied over.
--
-- Exactly one row per connection: a partitioned table's unique keys must
-- hold the partition key, so the primary key is (connection_id,
-- disconnected_at). That alone would not do: after a Redis failover the same
-- connection can end twice with two different times (closed, then swept on
-- the promoted replica), and the first archived end must stand.
-- connection_history_ids keeps one row per connection id, and a trigger
-- skips a history row whose id is there already, whoever inserts it, the
-- way ON CONFLICT DO NOTHING would (the row is not RETURNed).

ALTER TABLE connection_history RENAME TO connection_history_unpartitioned;
ALTER TABLE connection_history_unpartitioned
    RENAME CONSTRAINT connection_history_pkey TO connection_history_unpartitioned_pkey;
DROP INDEX IF EXISTS connection_history_session_time;
DROP INDEX IF EXISTS connection_history_user_time;
DROP INDEX IF EXISTS connection_history_session_uid_idx;

CREATE TABLE connection_history (
    connection_id     uuid        NOT NULL,
    session_id        text        NOT NULL,
    user_id           text        NOT NULL,
    protocol          text        NOT NULL,
    client_ip         inet        NULL,
    user_agent        text        NULL,
    connected_at      timestamptz NOT NULL,
    disconnected_at   timestamptz NOT NULL,
    last_heartbeat_at timestamptz NOT NULL,
    end_reason        text        NOT NULL
        CONSTRAINT connection_history_end_reason_check
        CHECK (end_reason IN ('closed', 'expired', 'max_duration')),
    archived_at       timestamptz NOT NULL DEFAULT now(),
    session_uid       text        NULL
) PARTITION BY RANGE (disconnected_at);

-- Rows beyond every month's partition (a clock far off, a month not created
-- yet) land here rather than fail the archive. Creating a month's partition
-- moves its rows out of here first.
CREATE TABLE connection_history_default PARTITION OF connection_history DEFAULT;

-- One partition per month (UTC), named connection_history_pYYYYMM: from the
-- oldest row's month to two months ahead. The reaper keeps it so.
DO $$
DECLARE
    first_month timestamptz;
    last_month  timestamptz := date_trunc('month', now(), 'UTC') + interval '2 months';
    m           timestamptz;
BEGIN
    SELECT date_trunc('month', min(disconnected_at), 'UTC') INTO first_month
        FROM connection_history_unpartitioned;
    m := least(coalesce(first_month, last_month), date_trunc('month', now(), 'UTC'));
    WHILE m <= last_month LOOP
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF connection_history FOR VALUES FROM (%L) TO (%L)',
            'connection_history_p' || to_char(m AT TIME ZONE 'UTC', 'YYYYMM'),
            m, (m AT TIME ZONE 'UTC' + interval '1 month') AT TIME ZONE 'UTC');
        m := (m AT TIME ZONE 'UTC' + interval '1 month') AT TIME ZONE 'UTC';
    END LOOP;
END $$;

-- Which connection ids have their row, and where (its disconnected_at).
CREATE TABLE connection_history_ids (
    connection_id   uuid        NOT NULL,
    disconnected_at timestamptz NOT NULL
);

INSERT INTO connection_history_ids (connection_id, disconnected_at)
    SELECT connection_id, disconnected_at FROM connection_history_unpartitioned;
INSERT INTO connection_history
    (connection_id, session_id, user_id, protocol, client_ip, user_agent, connected_at,
     disconnected_at, last_heartbeat_at, end_reason, archived_at, session_uid)
    SELECT connection_id, session_id, user_id, protocol, client_ip, user_agent, connected_at,
           disconnected_at, last_heartbeat_at, end_reason, archived_at, session_uid
    FROM connection_history_unpartitioned;
DROP TABLE connection_history_unpartitioned;

-- Keys and indexes are built after the copy: one sort per partition beats
-- millions of inserts into them.
ALTER TABLE connection_history_ids ADD PRIMARY KEY (connection_id);
ALTER TABLE connection_history ADD PRIMARY KEY (connection_id, disconnected_at);
-- The same reads as before: a session's and a user's history, newest first.
CREATE INDEX connection_history_session_time
    ON connection_history (session_id, disconnected_at DESC);
CREATE INDEX connection_history_user_time
    ON connection_history (user_id, disconnected_at DESC);
CREATE INDEX connection_history_session_uid_idx
    ON connection_history (session_id, session_uid, disconnected_at DESC);

-- Claims the id before the row is written; a row whose id is taken is
-- skipped. Concurrent inserts of one id wait on each other's claim (the
-- unique index), so two leaders overlapping write one row.
CREATE FUNCTION connection_history_claim_id() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO connection_history_ids (connection_id, disconnected_at)
        VALUES (NEW.connection_id, NEW.disconnected_at)
        ON CONFLICT (connection_id) DO NOTHING;
    IF FOUND THEN
        RETURN NEW;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER connection_history_claim_id
    BEFORE INSERT ON connection_history
    FOR EACH ROW EXECUTE FUNCTION connection_history_claim_id();

-- A row deleted by hand gives its id back, so the entry can be archived
-- again. (Retention drops partitions, which fires nothing: it deletes the
-- ids of a dropped month itself.)
CREATE FUNCTION connection_history_release_id() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM connection_history_ids
        WHERE connection_id = OLD.connection_id AND disconnected_at = OLD.disconnected_at;
    RETURN OLD;
END $$;

CREATE TRIGGER connection_history_release_id
    AFTER DELETE ON connection_history
    FOR EACH ROW EXECUTE FUNCTION connection_history_release_id();
