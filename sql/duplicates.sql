-- The same image content stored under several paths (same SHA-256), with its label.
-- Parameters: model (an identity or a prefix of one; default: the newest).
WITH repeated AS (
  -- The model's repeated hashes, grouped on ix_images_present_hashes alone.
  SELECT h.sha256, COUNT(*) AS copies
  FROM images h
  WHERE h.model_id = (SELECT m.id FROM models m WHERE m.identity = :model)
    AND h.sha256 IS NOT NULL
    AND h.error IS NULL
    AND h.missing_since IS NULL
    AND h.out_of_set IS NOT TRUE
  GROUP BY h.sha256
  HAVING COUNT(*) > 1
)
SELECT r.sha256, r.copies, MIN(i.path) AS first_path, MAX(i.path) AS last_path,
       MIN(i.label) AS label
FROM repeated r
CROSS JOIN images i  -- from the few repeated hashes to their rows (SQLite keeps the order)
WHERE i.sha256 = r.sha256
  AND i.model_id = (SELECT m.id FROM models m WHERE m.identity = :model)
  AND i.error IS NULL
  AND i.missing_since IS NULL
  AND i.out_of_set IS NOT TRUE
GROUP BY r.sha256, r.copies
ORDER BY r.copies DESC, first_path;
