-- Images to check by eye: labeled, but with a confidence below :threshold.
-- Parameters: threshold (0..1).
SELECT i.path, i.label, i.confidence, m.identity AS model
FROM images i
JOIN models m ON m.id = i.model_id
WHERE i.error IS NULL
  AND i.confidence < CAST(:threshold AS REAL)
ORDER BY i.confidence, i.path;
