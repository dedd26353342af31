-- GET /v1/usage. $1 from, $2 to (timestamptz), $3 'user' or 'session',
-- $4 a user_id or NULL, $5 whether the daily rollup may be used (not when a
-- grouping by session is filtered by user: the rollup has no user there).
-- Whole UTC days with a fresh rollup come from connection_usage_daily; the
-- partial first and last days and stale days from connection_history
-- (migrations/0005_usage.sql). Run with the settings of USAGE_SETTINGS
-- (usage.rs): custom plans, no JIT, 64 MB of work_mem.
WITH pieces AS (
    SELECT g.day,
           greatest(g.day, $1) AS a,
           least(g.day + interval '24 hours', $2) AS z,
           $5 AND g.day >= $1 AND g.day + interval '24 hours' <= $2
              AND NOT EXISTS (SELECT 1 FROM connection_usage_dirty d WHERE d.day = g.day) AS clean
    FROM generate_series(date_trunc('day', $1, 'UTC'), $2 - interval '1 microsecond',
                         interval '24 hours') AS g(day)
), parts AS (
    SELECT r.key, sum(r.connected_seconds) AS connected_seconds,
           sum(r.connections) AS connections, max(r.peak_concurrent) AS peak_concurrent
    FROM connection_usage_daily r
    -- The range, then its clean days: one scan of the key's index over it.
    WHERE r.group_by = $3 AND r.day >= $1 AND r.day < $2
      AND r.day IN (SELECT p.day FROM pieces p WHERE p.clean)
      AND ($4::text IS NULL OR r.key = $4)
    GROUP BY r.key
    UNION ALL
    SELECT u.key, u.connected_seconds, u.connections, u.peak_concurrent
    FROM pieces p, LATERAL connection_usage_in(p.a, p.z, $3, $4, p.a = $1) AS u
    WHERE NOT p.clean
    UNION ALL
    -- Connections already open at `from` when its day comes from the rollup
    -- (which counts the connections that started that day).
    SELECT CASE $3 WHEN 'user' THEN h.user_id ELSE h.session_id END, 0, 1, 0
    FROM pieces p
    JOIN connection_history h
      ON tstzrange(h.connected_at, greatest(h.connected_at, h.disconnected_at), '[]') @> $1
    WHERE p.clean AND p.a = $1
      AND h.connected_at < $1 AND h.disconnected_at > $1
      AND ($4::text IS NULL OR h.user_id = $4)
)
SELECT key, sum(connected_seconds)::double precision AS connected_seconds,
       sum(connections)::bigint AS connections, max(peak_concurrent)::integer AS peak_concurrent
FROM parts
GROUP BY key
ORDER BY key
