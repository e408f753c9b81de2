-- The same image content stored under several paths (same SHA-256), with its label.
-- Parameters: model (an identity or a prefix of one; default: the newest).
SELECT h.sha256, COUNT(*) AS copies, MIN(h.path) AS first_path, MAX(h.path) AS last_path,
       MIN(h.label) AS label
FROM images h
-- One pass in hash order over ix_images_present_hashes, which holds every column named
-- here: the table is never read.
WHERE h.model_id = (SELECT m.id FROM models m WHERE m.identity = :model)
  AND h.sha256 IS NOT NULL
  AND h.error IS NULL
  AND h.missing_since IS NULL
  AND h.out_of_set IS NOT TRUE
GROUP BY h.sha256
HAVING COUNT(*) > 1
ORDER BY copies DESC, first_path;
