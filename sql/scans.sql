-- The most recent scans, newest first: when each ran, how it ended, its roots and what it
-- did (for checking the nightly job). Roots: the JSON list the scan was given; seen, labeled,
-- unchanged, errors; skipped: files not taken as images; missing: stored files found gone.
-- A scan still marked running whose heartbeat has lapsed is shown as interrupted.
-- Parameters: none.
SELECT s.id, m.identity AS model,
       CASE WHEN s.status = 'running' AND s.alive_until < CURRENT_TIMESTAMP
            THEN 'interrupted' ELSE s.status END AS status,
       s.started_at, s.finished_at, s.host, s.pid,
       CAST(s.roots AS TEXT) AS roots,
       s.seen, s.labeled, s.unchanged, s.errors, s.skipped, s.missing, s.reason
FROM scans s
LEFT JOIN models m ON m.id = s.model_id
ORDER BY s.id DESC
LIMIT 20;
