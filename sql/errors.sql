-- Files a model could not label, and why (files found gone since are left out).
-- Parameters: model (identity; default: the newest).
SELECT i.path, i.error, i.labeled_at
FROM images i
JOIN models m ON m.id = i.model_id
WHERE m.identity = :model
  AND i.error IS NOT NULL
  AND i.missing_since IS NULL
ORDER BY i.path;
