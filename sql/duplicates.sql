-- The same image content stored under several paths (same SHA-256), with its label.
-- Parameters: model (an identity or a prefix of one; default: the newest).
SELECT i.sha256, COUNT(*) AS copies, MIN(i.path) AS first_path, MAX(i.path) AS last_path,
       MIN(i.label) AS label
FROM images i
JOIN models m ON m.id = i.model_id
WHERE m.identity = :model
  AND i.sha256 IS NOT NULL
  AND i.error IS NULL
  AND i.missing_since IS NULL
  AND i.out_of_set IS NOT TRUE
GROUP BY i.sha256
HAVING COUNT(*) > 1
ORDER BY copies DESC, first_path;
