-- Usage (GET /v1/usage): connected time, connections and peak concurrency
-- per user or per session over a time range, from connection_history.
--
-- Summing a month straight from the history (about 800,000 rows at 10
-- million a year) takes over a second, most of it sorting for the peak. So
-- whole UTC days come from a daily rollup; the rest of a range (its partial
-- first and last days, and days whose rollup is stale) from the history.
-- See docs/benchmarks.md, "Usage query".
--
-- The rollup is exact for a day once it is refreshed: any insert or delete
-- of history touching a day marks the day dirty (in the same transaction),
-- and a dirty day is read from the history until the reaper refreshes it.

-- The history rows overlapping a time range, whatever their month.
-- (greatest: a row whose clock went backwards still indexes.)
CREATE INDEX connection_history_span ON connection_history
    USING gist (tstzrange(connected_at, greatest(connected_at, disconnected_at), '[]'));

-- One row per UTC day, grouping and key with any connected time that day.
-- connections counts the connections that started that day; connected
-- seconds and the peak are within the day.
CREATE TABLE connection_usage_daily (
    group_by          text             NOT NULL CHECK (group_by IN ('user', 'session')),
    day               timestamptz      NOT NULL,
    key               text             NOT NULL,
    connected_seconds double precision NOT NULL,
    connections       bigint           NOT NULL,
    peak_concurrent   integer          NOT NULL,
    -- The values ride in the key's index: a range of days is read from the
    -- index alone.
    PRIMARY KEY (group_by, day, key) INCLUDE (connected_seconds, connections, peak_concurrent)
);

-- Days whose rollup is stale (or missing).
CREATE TABLE connection_usage_dirty (
    day timestamptz PRIMARY KEY
);

-- Usage per key of the history rows overlapping [p_from, p_to): time
-- clipped to the range, connections that started in it (all overlapping ones
-- with p_count_all), and the most connections of the key at once (a sweep
-- over their starts and ends; an end sorts before a start at the same
-- instant, as the ranges are half-open).
CREATE FUNCTION connection_usage_in(
    p_from timestamptz, p_to timestamptz, p_group text, p_user text, p_count_all boolean)
RETURNS TABLE (key text, connected_seconds double precision, connections bigint,
               peak_concurrent integer)
LANGUAGE sql STABLE AS $$
    WITH r AS (
        SELECT CASE p_group WHEN 'user' THEN h.user_id ELSE h.session_id END AS key,
               greatest(h.connected_at, p_from) AS a,
               least(greatest(h.connected_at, h.disconnected_at), p_to) AS z,
               p_count_all OR h.connected_at >= p_from AS counted
        FROM connection_history h
        WHERE tstzrange(h.connected_at, greatest(h.connected_at, h.disconnected_at), '[]')
                  && tstzrange(p_from, p_to)
          AND h.disconnected_at >= p_from
          AND (h.disconnected_at > p_from OR h.connected_at >= p_from)
          AND (p_user IS NULL OR h.user_id = p_user)
    ), events AS (
        SELECT r.key, r.a AS t, 1 AS delta FROM r
        UNION ALL
        SELECT r.key, r.z, -1 FROM r
    ), running AS (
        SELECT e.key, sum(e.delta) OVER (PARTITION BY e.key ORDER BY e.t, e.delta
                                         ROWS UNBOUNDED PRECEDING) AS n
        FROM events e
    ), peaks AS (
        SELECT running.key, max(running.n) AS peak FROM running GROUP BY running.key
    ), totals AS (
        SELECT r.key, sum(extract(epoch FROM r.z - r.a))::double precision AS seconds,
               count(*) FILTER (WHERE r.counted) AS connections
        FROM r GROUP BY r.key
    )
    SELECT t.key, t.seconds, t.connections, greatest(p.peak, 1)::integer
    FROM totals t JOIN peaks p ON p.key = t.key
$$;

-- Refreshes one dirty day's rollup; false if the day is not dirty. The
-- dirty row stays locked until commit: an archive marking the day meanwhile
-- waits, and marks it again after (its rows were not seen here).
CREATE FUNCTION connection_usage_refresh(p_day timestamptz) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM connection_usage_dirty WHERE day = p_day FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    DELETE FROM connection_usage_daily WHERE day = p_day;
    INSERT INTO connection_usage_daily
        (group_by, day, key, connected_seconds, connections, peak_concurrent)
        SELECT g.kind, p_day, u.key, u.connected_seconds, u.connections, u.peak_concurrent
        FROM (VALUES ('user'), ('session')) AS g(kind),
             LATERAL connection_usage_in(p_day, p_day + interval '24 hours', g.kind, NULL, false) u;
    DELETE FROM connection_usage_dirty WHERE day = p_day;
    RETURN true;
END $$;

-- Marks the days the changed rows overlap. DO UPDATE, not DO NOTHING: it
-- waits for a refresh holding the day, so the mark is not lost to it. In day
-- order, so that concurrent archives lock days in one order.
CREATE FUNCTION connection_usage_mark() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO connection_usage_dirty (day)
        SELECT DISTINCT d
        FROM changed c,
             generate_series(date_trunc('day', c.connected_at, 'UTC'),
                             greatest(c.connected_at, c.disconnected_at),
                             interval '24 hours') AS d
        ORDER BY d
        ON CONFLICT (day) DO UPDATE SET day = excluded.day;
    RETURN NULL;
END $$;

CREATE TRIGGER connection_usage_mark_inserted
    AFTER INSERT ON connection_history
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION connection_usage_mark();

CREATE TRIGGER connection_usage_mark_deleted
    AFTER DELETE ON connection_history
    REFERENCING OLD TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION connection_usage_mark();

-- The history archived so far has no rollup yet.
INSERT INTO connection_usage_dirty (day)
    SELECT DISTINCT d
    FROM connection_history c,
         generate_series(date_trunc('day', c.connected_at, 'UTC'),
                         greatest(c.connected_at, c.disconnected_at),
                         interval '24 hours') AS d
    ON CONFLICT DO NOTHING;
