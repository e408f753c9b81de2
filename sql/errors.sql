-- Files that could not be labeled, with the reason.
-- Parameters: none.
SELECT i.path, i.error, m.identity AS model, i.labeled_at
FROM images i
JOIN models m ON m.id = i.model_id
WHERE i.error IS NOT NULL
ORDER BY i.path;
