-- Files that scans found gone, oldest first: what `modlabel prune` would delete.
-- Parameters: model (an identity or a prefix of one; default: the newest).
SELECT i.path, i.missing_since, i.label, i.error
FROM images i
JOIN models m ON m.id = i.model_id
WHERE m.identity = :model
  AND i.missing_since IS NOT NULL
ORDER BY i.missing_since, i.path;
