-- The most recent scans: when they ran, how they ended and what they did (for checking the
-- nightly job). A scan still marked running whose heartbeat has lapsed is shown as interrupted.
-- Parameters: none.
SELECT s.id, m.identity AS model,
       CASE WHEN s.status = 'running' AND s.alive_until < CURRENT_TIMESTAMP
            THEN 'interrupted' ELSE s.status END AS status,
       s.started_at, s.finished_at, s.host, s.pid,
       s.roots, s.seen, s.labeled, s.unchanged, s.errors, s.skipped, s.missing, s.reason
FROM scans s
LEFT JOIN models m ON m.id = s.model_id
ORDER BY s.id DESC
LIMIT 20;
