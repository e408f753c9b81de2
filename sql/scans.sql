-- The most recent scans: when they ran and what they did (for checking the nightly job).
-- Parameters: none.
SELECT s.id, m.identity AS model, s.started_at, s.finished_at,
       s.seen, s.labeled, s.unchanged, s.errors
FROM scans s
JOIN models m ON m.id = s.model_id
ORDER BY s.id DESC
LIMIT 20;
